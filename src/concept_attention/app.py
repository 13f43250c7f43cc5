"""The web app: generate or explain images (or videos) with concept maps in the browser (gradio).

``concept-attention app [--model ID_OR_PATH] [--host 127.0.0.1] [--port 7860] [--share no]``

One pipeline instance is shared; gradio's queue runs one request at a time and each request
opens its own ConceptAttention session, so concurrent users never see each other's maps.
A video model (CogVideoX) gets the same two tabs for videos: a frame-count choice, a video
upload, one heat-map video per concept and a contact sheet (frames × concepts) in place of the
segmentation. Errors a user can cause (no concepts, too many, unreadable uploads, sizes the model cannot take)
are shown as a message in the page; the app keeps serving.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import viz
from .core.maps import ConceptMaps
from .explanation import explain, load_image
from .generation import generate
from .options import MAX_CONCEPTS, adapter_of, check_concepts, default_layers, model_notice, pipeline_defaults, \
    size_rule, valid_frame_counts

GENERIC_EXAMPLES = [
    {"prompt": "a dog by a tree in a park", "concepts": ["dog", "tree", "grass", "sky"]},
    {"prompt": "a red car on a street", "concepts": ["car", "street", "building", "sky"]},
]


class UserInputError(ValueError):
    """A problem with what the user entered; shown in the page."""


def clean_concepts(concepts: Any) -> list[str]:
    """Concepts from a multi-value input (items may hold comma-separated names), by the rule every front
    end uses (``options.check_concepts``: no empty names, no duplicates, at most MAX_CONCEPTS)."""
    items = [concepts] if isinstance(concepts, str) else list(concepts or [])
    names = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if not names:
        raise UserInputError("Add at least one concept (e.g. dog, sky, background).")
    try:
        return check_concepts(names)
    except (TypeError, ValueError) as error:
        raise UserInputError(f"Concepts: {error}.") from None


def segmentation_with_legend(maps: ConceptMaps, image: Image.Image) -> Image.Image:
    """The argmax segmentation in the legend's exact colours (nothing blended), with the legend below."""
    base = enlarged(viz.to_rgb_image(image))
    labels = viz.segmentation_labels(maps, 0, (base.height, base.width))
    segmentation = viz.segmentation_image(labels, maps.concepts)
    palette = viz.concept_palette(maps.concepts)
    font, row = ImageFont.load_default(), 18
    legend = Image.new("RGB", (segmentation.width, row * len(maps.concepts) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for i, name in enumerate(maps.concepts):
        top = 3 + i * row
        draw.rectangle([6, top + 2, 20, top + 14], fill=tuple(int(c) for c in palette[i]), outline=(0, 0, 0))
        draw.text((26, top + 2), name, fill=(0, 0, 0), font=font)
    canvas = Image.new("RGB", (segmentation.width, segmentation.height + legend.height), (255, 255, 255))
    canvas.paste(segmentation, (0, 0))
    canvas.paste(legend, (0, segmentation.height))
    return canvas


def result_views(maps: ConceptMaps, workdir: Path) -> tuple:
    """(image, overlays, segmentation, cross-attention overlays, zip path) for the page."""
    image = maps.image
    display = enlarged(image)
    overlays = [(maps.overlay(display, c), c) for c in maps.concepts]
    cross = maps.others.get("cross_attention")
    cross_overlays = [(cross.overlay(display, c), f"{c} (cross-attention)") for c in cross.concepts] if cross else []
    segmentation = segmentation_with_legend(maps, image)
    folder = workdir / "concept-maps"
    maps.save(folder)
    archive = shutil.make_archive(str(workdir / "concept-maps"), "zip", root_dir=folder)
    return display, overlays, segmentation, cross_overlays, archive


def enlarged(image: Image.Image, at_least: int = 256) -> Image.Image:
    """Small model outputs enlarged for the page by a whole factor (nearest keeps pixels crisp); others unchanged."""
    if max(image.size) >= at_least:
        return image
    factor = at_least // max(image.size)
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def video_views(maps: ConceptMaps, workdir: Path) -> tuple:
    """(video, heat-map videos, contact sheet, cross-attention heat-map videos, zip path) for the page.

    The page's videos are MP4 (browsers play them; needs the ``video`` extra), over the frames
    enlarged like small images; the zip holds the result folder as ``maps.save`` writes it. Frames
    that need no enlarging are encoded once: the page shows the zip's own heat-map videos.
    """
    from . import video

    frames = [enlarged(frame) for frame in maps.frames]
    fps = float(maps.meta.get("fps") or 8.0)
    shown = workdir / "shown"
    shown.mkdir(exist_ok=True)
    folder = workdir / "concept-maps"
    maps.save(folder, figure=False, video_format="mp4")
    archive = shutil.make_archive(str(workdir / "concept-maps"), "zip", root_dir=folder)
    reuse = all(frame.size == original.size for frame, original in zip(frames, maps.frames))
    clip = video.write_video(shown / "video.mp4", [np.asarray(frame) for frame in frames], fps=fps)

    def heat_videos(which: ConceptMaps, name: str, caption: str) -> list[tuple[str, str]]:
        (shown / name).mkdir()
        stems = {concept: str(index) for index, concept in enumerate(which.concepts)}
        names = video.save_video_maps(which, shown / name, stems, frames, fps=fps, video_format="mp4")
        return [(str(shown / name / names[concept]), caption.format(concept)) for concept in which.concepts]

    if reuse:
        saved = json.loads((folder / "meta.json").read_text())["video_files"]
        overlays = [(str(folder / saved[concept]), concept) for concept in maps.concepts]
        sheet = Image.open(folder / saved["contact_sheet"])
    else:
        overlays = heat_videos(maps, "maps", "{}")
        sheet = Image.open(shown / "maps" / "contact_sheet.png")
    cross = maps.others.get("cross_attention")
    cross_overlays = heat_videos(cross, "cross", "{} (cross-attention)") if cross is not None else []
    return str(clip), overlays, sheet, cross_overlays, archive


class ConceptApp:
    """Request handlers around one shared pipeline (a lock makes sure one request runs at a time)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.defaults = pipeline_defaults(pipe)
        self.adapter = adapter_of(pipe)
        self.video = bool(self.adapter.video)
        """Whether the model makes videos (CogVideoX): uploads are videos, results heat-map videos."""
        self._lock = threading.Lock()
        self._tmp = Path(tempfile.mkdtemp(prefix="concept-attention-app-"))
        self._count = 0

    def _workdir(self) -> Path:
        self._count += 1
        path = self._tmp / f"request-{self._count}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def num_layers(self) -> int:
        return len(self.adapter.dual_blocks)

    def frame_counts(self) -> list[int]:
        """Frame counts the video model accepts, up to its native count (empty for image models)."""
        if not self.video:
            return []
        ratio, multiple, native = self.adapter.frame_rule(self.pipe)
        return valid_frame_counts(ratio, multiple, native)

    def _read_upload(self, file: Any) -> Any:
        """The uploaded picture (image models) or the upload's path after a check of its first frame (video)."""
        if file is None:
            raise UserInputError(f"Upload {'a video' if self.video else 'an image'} first.")
        try:
            if self.video:
                from .video import load_video

                load_video(file, max_frames=1)
                return file
            return load_image(file)
        except (ValueError, TypeError, FileNotFoundError, OSError) as error:
            raise UserInputError(f"Cannot use this upload: {readable_error(error)}") from None

    def _views(self, maps: ConceptMaps) -> tuple:
        return video_views(maps, self._workdir()) if maps.is_video else result_views(maps, self._workdir())

    def run_generate(self, prompt: str, concepts: Any, seed: float, steps: float, width: float, height: float,
                     frames: Any = None, progress: Any = None) -> tuple:
        """Generate and explain; ``frames`` (video models) is the number of frames to generate."""
        names = clean_concepts(concepts)
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserInputError("Enter a prompt.")

        def on_step(done: int, total: int) -> None:
            if progress is not None and total:
                progress((done, total), desc="denoising")

        with self._lock:
            try:
                maps = generate(self.pipe, prompt.strip(), names, steps=int(steps), seed=int(seed),
                                size=(int(width), int(height)), on_step=on_step,
                                num_frames=int(frames) if frames and self.video else None)
            except (ValueError, TypeError) as error:
                raise UserInputError(str(error)) from None
            return self._views(maps)

    def run_explain(self, file: Any, concepts: Any, prompt: str, timestep: float, samples: float,
                    layer_start: float, layer_end: float, frames: Any = None, progress: Any = None) -> tuple:
        """Explain an uploaded image (or video); ``frames`` = leading frames to explain, 0/None: all that fit."""
        names = clean_concepts(concepts)
        picture = self._read_upload(file)
        start, end = int(layer_start), int(layer_end)
        if start > end:
            raise UserInputError(f"The layer range {start}–{end} is empty: the start must not exceed the end.")
        with self._lock:
            if progress is not None:
                progress(0.1, desc="encoding and explaining")
            options = dict(prompt=prompt or "", timestep=float(timestep), num_samples=int(samples),
                           layers=list(range(start, end + 1)), space=["output", "cross_attention"])
            try:
                if self.video:
                    from .video_explanation import explain_video

                    maps = explain_video(self.pipe, picture, names, num_frames=int(frames) if frames else None,
                                         **options)
                else:
                    maps = explain(self.pipe, picture, names, **options)
            except (ValueError, TypeError) as error:
                raise UserInputError(str(error)) from None
            return self._views(maps)


def readable_error(error: Exception) -> str:
    """An upload error without server paths or object addresses (what the page shows)."""
    text = re.sub(r"(/[^\s:'\"]+)+/", "", str(error))  # keep file names, drop directories
    return re.sub(r"<[^>]* at 0x[0-9a-f]+>", "the upload", text)


def result_component(gr: Any, video: bool, label: str, elem_id: str) -> Any:
    """Where the generated or uploaded picture is shown: a video player for video models."""
    if video:
        return gr.Video(label=label, elem_id=elem_id)
    return gr.Image(label=label, elem_id=elem_id, type="pil")


@dataclass
class PageSettings:
    """What the page shows before any request: examples, sizes, steps, frame counts, layers."""

    examples: list[dict]
    vocabulary: list[str]
    width: int
    height: int
    multiple: int
    steps: int
    frame_counts: list[int]
    num_layers: int
    default_layers: list[int]
    timestep: float
    video: bool

    @classmethod
    def of(cls, app: "ConceptApp") -> "PageSettings":
        pipe, defaults = app.pipe, app.defaults
        examples = defaults.get("examples") or GENERIC_EXAMPLES
        native, multiple = size_rule(pipe)
        width = height = int(defaults.get("size") or native)
        if app.video and not defaults.get("size"):
            width, height = app.adapter.native_frame_size(pipe)
        return cls(examples=examples, vocabulary=sorted({c for e in examples for c in e["concepts"]}), width=width,
                   height=height, multiple=multiple, steps=int(defaults.get("num_inference_steps") or 4),
                   frame_counts=app.frame_counts(), num_layers=app.num_layers, default_layers=default_layers(pipe),
                   timestep=float(defaults.get("timestep", 0.5)), video=app.video)

    @property
    def per_frame(self) -> str:
        return " (videos)" if self.video else ""

    @property
    def sheet_label(self) -> str:
        return "Contact sheet (frames × concepts)" if self.video else "Segmentation (argmax over concepts)"


def guarded(gr: Any, function: Any) -> Any:
    """``function`` with user mistakes shown as a message in the page and other errors as one line.

    The wrapper keeps ``function``'s signature (its parameter names are the API's parameter names;
    ``progress`` gets gradio's progress tracker).
    """
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except UserInputError as error:
            raise gr.Error(str(error)) from None
        except Exception as error:  # keep serving; no stack trace in the page
            raise gr.Error(f"Something went wrong: {type(error).__name__}: {error}") from None

    signature = inspect.signature(function)
    wrapper.__signature__ = signature.replace(parameters=[
        parameter.replace(default=gr.Progress()) if parameter.name == "progress" else parameter
        for parameter in signature.parameters.values()])
    wrapper.__name__ = function.__name__
    return wrapper


def concept_input(gr: Any, page: PageSettings, elem_id: str) -> Any:
    return gr.Dropdown(choices=page.vocabulary, value=page.examples[0]["concepts"], multiselect=True,
                       allow_custom_value=True, label=f"Concepts (up to {MAX_CONCEPTS})", elem_id=elem_id)


def result_column(gr: Any, page: PageSettings, label: str, prefix: str) -> tuple[Any, Any]:
    """Beside the inputs: the picture and the segmentation (or contact sheet)."""
    with gr.Column():
        image = result_component(gr, page.video, label, f"{prefix}-image")
        segmentation = gr.Image(label=page.sheet_label, type="pil")
    return image, segmentation


def result_rows(gr: Any, page: PageSettings, prefix: str, image: Any, segmentation: Any) -> list[Any]:
    """Below the inputs: the maps, the baseline maps, the zip; returns every output in handler order."""
    gallery = gr.Gallery(label=f"ConceptAttention maps{page.per_frame}", columns=4, elem_id=f"{prefix}-gallery")
    cross = gr.Gallery(label=f"Raw cross-attention maps (baseline){page.per_frame}", columns=4)
    archive = gr.File(label="Download the result folder (zip)")
    return [image, gallery, segmentation, cross, archive]


def generate_tab(gr: Any, app: "ConceptApp", page: PageSettings) -> None:
    first, largest = page.examples[0], max(page.width, page.height) * 4
    with gr.Row():
        with gr.Column():
            prompt = gr.Dropdown(choices=[e["prompt"] for e in page.examples], value=first["prompt"],
                                 allow_custom_value=True, label="Prompt", elem_id="gen-prompt")
            concepts = concept_input(gr, page, "gen-concepts")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed")
                steps = gr.Slider(1, max(50, page.steps), value=page.steps, step=1, label="Steps")
            with gr.Row():
                width = gr.Slider(page.multiple, largest, value=page.width, step=page.multiple, label="Width")
                height = gr.Slider(page.multiple, largest, value=page.height, step=page.multiple, label="Height")
            extra = [gr.Dropdown(choices=[(str(n), n) for n in page.frame_counts], value=page.frame_counts[-1],
                                 label="Frames", elem_id="gen-frames")] if page.video else []
            button = gr.Button("Generate", variant="primary", elem_id="gen-button")
        shown = result_column(gr, page, "Generated video" if page.video else "Generated image", "gen")
    outputs = result_rows(gr, page, "gen", *shown)

    def fill_concepts(chosen: str):
        matching = [example["concepts"] for example in page.examples if example["prompt"] == chosen]
        return gr.update(value=matching[0]) if matching else gr.update()

    prompt.change(fill_concepts, prompt, concepts)
    button.click(guarded(gr, app.run_generate), [prompt, concepts, seed, steps, width, height, *extra], outputs,
                 api_name="generate")


def explain_tab(gr: Any, app: "ConceptApp", page: PageSettings) -> None:
    last = page.num_layers - 1
    with gr.Row():
        with gr.Column():
            upload = gr.File(label="Video (MP4, WebM, GIF, ...)" if page.video else "Image (any common format)",
                             file_types=["video", ".gif"] if page.video else ["image"], type="filepath",
                             elem_id="exp-upload")
            concepts = concept_input(gr, page, "exp-concepts")
            prompt = gr.Textbox(value="", label="Prompt (optional)")
            timestep = gr.Slider(0.05, 1.0, value=page.timestep, step=0.05, label="Noise timestep t")
            samples = gr.Slider(1, 10, value=4, step=1, label="Noise samples")
            with gr.Row():
                start = gr.Slider(0, last, value=min(page.default_layers), step=1, label="First layer")
                end = gr.Slider(0, last, value=max(page.default_layers), step=1, label="Last layer")
            extra = [gr.Dropdown(choices=[("all the video has, up to the model's", 0)]
                                 + [(str(n), n) for n in page.frame_counts], value=0,
                                 label="Leading frames to explain", elem_id="exp-frames")] if page.video else []
            button = gr.Button("Explain", variant="primary", elem_id="exp-button")
        shown = result_column(gr, page, "Video" if page.video else "Image", "exp")
    outputs = result_rows(gr, page, "exp", *shown)
    button.click(guarded(gr, app.run_explain), [upload, concepts, prompt, timestep, samples, start, end, *extra],
                 outputs, api_name="explain")


def build_app(pipe: Any) -> Any:
    """The gradio Blocks app for ``pipe`` (not launched)."""
    import gradio as gr

    app = ConceptApp(pipe)
    page = PageSettings.of(app)
    kind = "a video" if page.video else "an image"
    notice = model_notice(pipe)
    with gr.Blocks(title="ConceptAttention") as demo:
        gr.Markdown(
            "# ConceptAttention\nWhere does the diffusion transformer see each concept? "
            f"Model: `{getattr(pipe, 'model_id', None) or type(pipe).__name__}`. Concepts need not appear in the "
            f"prompt (up to {MAX_CONCEPTS}); add a filler such as a background word so that every pixel has a home."
            + (f"\n\n**Note on this model:** {notice}" if notice else ""))
        with gr.Tab(f"Generate {kind}"):
            generate_tab(gr, app, page)
        with gr.Tab(f"Explain {kind}"):
            explain_tab(gr, app, page)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           device: str = "auto", dtype: str = "auto", block: bool = True) -> Any:
    """Load the model and serve the app; returns the gradio app (``block=False`` for tests)."""
    from .loading import load_pipeline

    pipe = load_pipeline(model, device=device, dtype=dtype)
    demo = build_app(pipe)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, show_error=False,
                quiet=True)
    if block:
        print(f"concept-attention app: serving {getattr(pipe, 'model_id', None) or 'the model'} at {demo.local_url}"
              + (f" and {demo.share_url}" if share and demo.share_url else " (a public link: --share yes)")
              + "; Ctrl-C stops it", flush=True)
        demo.block_thread()
    return demo

