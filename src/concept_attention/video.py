"""Video export of concept maps: one heat-map video per concept and a contact sheet.

Maps of a video model are ``(batch, concepts, frames, h, w)`` on the *latent* frame grid; a
decoded video usually has more frames (CogVideoX: ``(latent - 1) * 4 + 1``). :func:`frame_indices`
maps every video frame to its latent frame (causal VAEs: frame 0 alone, then groups of ``r``).

MP4 files are written with imageio's ffmpeg plugin (``pip install "concept-attention[video]"``,
i.e. ``imageio[ffmpeg]``, whose wheel bundles an ffmpeg binary); without it, or with
``video_format="gif"``, an animated GIF is written with Pillow instead.
"""

from __future__ import annotations

import warnings
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageSequence

from . import viz

if TYPE_CHECKING:  # pragma: no cover
    from .core.maps import ConceptMaps

VIDEO_FORMATS = ("auto", "mp4", "gif")
PIXELS_PER_PATCH = 16
"""Scale of heat-map videos written without source frames (one latent patch = 16 × 16 pixels)."""


def has_mp4_writer() -> bool:
    """Whether imageio and its ffmpeg plugin are importable (the ``video`` extra)."""
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def frame_indices(num_video_frames: int, num_map_frames: int) -> list[int]:
    """The map frame shown with each of ``num_video_frames`` video frames.

    When ``num_video_frames == (num_map_frames - 1) * r + 1`` (a causal video VAE with temporal
    ratio ``r``), frame 0 has map frame 0 and frames ``r(k-1)+1 .. rk`` have map frame ``k``;
    otherwise frames are spread proportionally.
    """
    if num_video_frames < 1 or num_map_frames < 1:
        raise ValueError("frame counts must be positive")
    if num_map_frames == 1:
        return [0] * num_video_frames
    ratio, rest = divmod(num_video_frames - 1, num_map_frames - 1)
    if rest == 0 and ratio >= 1:
        return [min(num_map_frames - 1, -(-i // ratio)) for i in range(num_video_frames)]
    return [min(num_map_frames - 1, i * num_map_frames // num_video_frames) for i in range(num_video_frames)]


def to_frames(video: Any) -> list[Image.Image]:
    """A list of RGB frames from a PIL list, a ``(F, H, W, 3)`` array/tensor or a ``(F, 3, H, W)`` tensor."""
    if isinstance(video, Image.Image):
        return [video.convert("RGB")]
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().float()
        if video.dim() == 4 and video.shape[1] in (1, 3, 4) and video.shape[-1] not in (1, 3, 4):
            video = video.permute(0, 2, 3, 1)
        video = video.numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"a video array must be (frames, H, W, channels), got shape {video.shape}")
        return [viz.to_rgb_image(frame) for frame in video]
    frames = [viz.to_rgb_image(frame) for frame in video]
    if not frames:
        raise ValueError("the video has no frames")
    return frames


def _even(size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) rounded up to even numbers (H.264 with yuv420p needs them)."""
    return (size[0] + size[0] % 2, size[1] + size[1] % 2)


def heat_frames(
    maps: "ConceptMaps",
    concept: str | int,
    frames: Sequence[Image.Image] | None = None,
    *,
    batch_index: int = 0,
    cmap: str = viz.DEFAULT_CMAP,
    alpha: float = 0.5,
    normalize: viz.Normalization = "per_concept",
) -> list[np.ndarray]:
    """RGB uint8 frames of one concept's heat map, blended over ``frames`` when given.

    Colours are normalised over the whole video (all frames of the concept), so the heat is
    comparable from frame to frame.
    """
    if maps.tensor.dim() != 5:
        raise ValueError("heat_frames needs video maps (batch, concepts, frames, h, w)")
    values = viz.normalize(maps.tensor, normalize)[batch_index, maps.index(concept)]  # (F, h, w)
    count = values.shape[0]
    if frames:
        height, width = _even((frames[0].height, frames[0].width))
        bases = [f.convert("RGB").resize((width, height), Image.BILINEAR) if f.size != (width, height) else f
                 for f in frames]
        order = frame_indices(len(bases), count)
    else:
        height, width = values.shape[1] * PIXELS_PER_PATCH, values.shape[2] * PIXELS_PER_PATCH
        bases, order = None, list(range(count))
    upsampled = viz.upsample(values, (height, width))
    coloured = [viz.colorize(upsampled[i], cmap) for i in range(count)]
    if bases is None:
        return coloured
    return [np.asarray(viz.blend(base, coloured[k], alpha)) for base, k in zip(bases, order)]


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: float = 8.0) -> Path:
    """Write RGB uint8 frames as MP4 (H.264, imageio-ffmpeg) or GIF (Pillow) by the path's suffix."""
    path = Path(path)
    if not frames:
        raise ValueError("no frames to write")
    if path.suffix.lower() == ".gif":
        pictures = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
        pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=int(round(1000 / fps)), loop=0)
        return path
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"unsupported video file type {path.suffix!r}; use .mp4 or .gif")
    if not has_mp4_writer():
        raise ImportError('writing MP4 needs imageio with ffmpeg: pip install "concept-attention[video]"')
    import imageio.v2 as imageio

    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=2,
                            ffmpeg_log_level="error", pixelformat="yuv420p") as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame, dtype=np.uint8))
    return path


def read_video(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Decode a video file (GIF with Pillow, MP4/WebM/... with imageio-ffmpeg) to ``(frames, H, W, 3)`` uint8.

    Only the first ``max_frames`` frames are decoded when given.
    """
    path = Path(path)
    if path.suffix.lower() == ".gif":
        with Image.open(path) as picture:
            frames = [np.asarray(frame.convert("RGB")) for frame in islice(ImageSequence.Iterator(picture), max_frames)]
        return np.stack(frames)
    import imageio.v2 as imageio

    with imageio.get_reader(path) as reader:
        return np.stack([np.asarray(frame)[..., :3] for frame in islice(reader, max_frames)])


def video_fps(path: str | Path) -> float | None:
    """Frames per second of a video file (GIF: from its frame duration), None if it does not say."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".gif":
            with Image.open(path) as picture:
                duration = picture.info.get("duration")
            return 1000.0 / duration if duration else None
        import imageio.v2 as imageio

        with imageio.get_reader(path) as reader:
            fps = reader.get_meta_data().get("fps")
        return float(fps) if fps else None
    except Exception:  # metadata is optional; the frames were already read
        return None


def load_video(video: Any, max_frames: int | None = None) -> list[Image.Image]:
    """RGB frames of a video file path or of anything :func:`to_frames` takes; at most ``max_frames``.

    A file that is missing or cannot be decoded raises FileNotFoundError / ValueError with the path.
    """
    if not isinstance(video, (str, Path)):
        return to_frames(video)[:max_frames]
    path = Path(video)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}")
    if path.suffix.lower() != ".gif" and not has_mp4_writer():
        raise ImportError(f'reading {path.suffix or "this"} video needs imageio with ffmpeg: '
                          'pip install "concept-attention[video]"')
    try:
        frames = read_video(path, max_frames)
    except Exception as error:  # Pillow and ffmpeg raise many types for damaged or non-video files
        raise ValueError(f"cannot read {path} as a video ({error.__class__.__name__}: {error})") from None
    return to_frames(frames)


def contact_sheet(
    maps: "ConceptMaps",
    frames: Sequence[Image.Image] | None = None,
    *,
    batch_index: int = 0,
    columns: int = 4,
    cell: int = 160,
    cmap: str = viz.DEFAULT_CMAP,
    alpha: float = 0.5,
) -> Image.Image:
    """A PNG-ready grid: ``columns`` evenly spaced frames × (the video row, if given, + one row per concept)."""
    if maps.tensor.dim() != 5:
        raise ValueError("contact_sheet needs video maps (batch, concepts, frames, h, w)")
    count = len(frames) if frames else maps.tensor.shape[2]
    picks = sorted(set(np.linspace(0, count - 1, num=min(columns, count)).round().astype(int).tolist()))
    rows: list[tuple[str, list[np.ndarray]]] = []
    if frames:
        rows.append(("video", [np.asarray(frames[i].convert("RGB")) for i in picks]))
    for concept in maps.concepts:
        heat = heat_frames(maps, concept, frames, batch_index=batch_index, cmap=cmap, alpha=alpha)
        rows.append((concept, [heat[i] for i in picks]))
    first = rows[0][1][0]
    scale = cell / max(first.shape[0], first.shape[1])
    cell_h, cell_w = max(1, round(first.shape[0] * scale)), max(1, round(first.shape[1] * scale))
    label_w, title_h, pad = 90, 18, 4
    sheet = Image.new("RGB", (label_w + len(picks) * (cell_w + pad), title_h + len(rows) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, index in enumerate(picks):
        draw.text((label_w + column * (cell_w + pad) + 2, 3), f"frame {index}", fill="black")
    for row, (label, images) in enumerate(rows):
        top = title_h + row * (cell_h + pad)
        draw.text((4, top + cell_h // 2 - 6), label[:14], fill="black")
        for column, image in enumerate(images):
            tile = Image.fromarray(image).resize((cell_w, cell_h), Image.BILINEAR)
            sheet.paste(tile, (label_w + column * (cell_w + pad), top))
    return sheet


def save_video_maps(
    maps: "ConceptMaps",
    directory: str | Path,
    stems: dict[str, str],
    frames: Sequence[Image.Image] | None = None,
    *,
    batch_index: int = 0,
    fps: float = 8.0,
    video_format: str = "auto",
    cmap: str = viz.DEFAULT_CMAP,
    alpha: float = 0.5,
) -> dict[str, str]:
    """Write ``<stem>.mp4`` (or ``.gif``) per concept and ``contact_sheet.png``; return file names.

    ``stems`` maps concept names to file stems (as :meth:`ConceptMaps.save` chose them).
    """
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"video_format must be one of {VIDEO_FORMATS}, not {video_format!r}")
    if video_format == "auto":
        if has_mp4_writer():
            video_format = "mp4"
        else:
            warnings.warn('imageio[ffmpeg] is not installed: writing GIFs instead of MP4 '
                          '(pip install "concept-attention[video]")', stacklevel=3)
            video_format = "gif"
    out = Path(directory)
    written: dict[str, str] = {}
    for concept in maps.concepts:
        name = f"{stems[concept]}.{video_format}"
        heat = heat_frames(maps, concept, frames, batch_index=batch_index, cmap=cmap, alpha=alpha)
        write_video(out / name, heat, fps=fps)
        written[concept] = name
    contact_sheet(maps, frames, batch_index=batch_index, cmap=cmap, alpha=alpha).save(out / "contact_sheet.png")
    written["contact_sheet"] = "contact_sheet.png"
    return written
