"""ConceptMaps: the typed result of a ConceptAttention run."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import viz

FORMAT_VERSION = 1


def concept_filename(name: str) -> str:
    """A file-system-safe stem for a concept name ("traffic light" -> "traffic_light")."""
    stem = re.sub(r"[^0-9A-Za-z._-]+", "_", name.strip()).strip("._")
    return stem or "concept"


@dataclass
class ConceptMaps:
    """Saliency maps, one per concept, on the model's latent patch grid.

    ``tensor`` is float32 ``(batch, concepts, h, w)`` (video: ``(batch, concepts, frames, h, w)``),
    averaged over ``layers`` and the denoising steps listed in ``steps`` (model timesteps in
    ``timesteps``). ``per_layer`` keeps the same maps per layer, ``(layers, batch, concepts, ...)``.
    """

    tensor: torch.Tensor
    concepts: list[str]
    layers: list[int]
    timesteps: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    space: str = "output"
    softmax: bool = True
    per_layer: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    image: Image.Image | None = field(default=None, repr=False, compare=False)
    """The image the maps belong to (generated or explained), used by ``save`` and ``figure``."""
    others: dict[str, "ConceptMaps"] = field(default_factory=dict, repr=False, compare=False)
    """Maps of the same run in other spaces (e.g. ``others["cross_attention"]``)."""
    frames: list[Image.Image] | None = field(default=None, repr=False, compare=False)
    """The video the maps belong to (video models), one RGB image per frame, used by ``save``."""

    def __post_init__(self) -> None:
        if self.tensor.dim() not in (4, 5):
            raise ValueError(f"maps must be (B, C, h, w) or (B, C, F, h, w), got {tuple(self.tensor.shape)}")
        if self.tensor.shape[1] != len(self.concepts):
            raise ValueError(f"{len(self.concepts)} concept names for {self.tensor.shape[1]} maps")

    # ----------------------------------------------------------------- access
    @property
    def batch_size(self) -> int:
        return self.tensor.shape[0]

    @property
    def grid(self) -> tuple[int, ...]:
        """Spatial (and temporal) shape of one map: (h, w) or (frames, h, w)."""
        return tuple(self.tensor.shape[2:])

    def index(self, concept: str | int) -> int:
        if isinstance(concept, int):
            if not -len(self.concepts) <= concept < len(self.concepts):
                raise IndexError(f"concept index {concept} out of range for {len(self.concepts)} concepts")
            return concept % len(self.concepts)
        try:
            return self.concepts.index(concept)
        except ValueError:
            raise KeyError(f"unknown concept {concept!r}; concepts are {self.concepts}") from None

    def __getitem__(self, concept: str | int) -> torch.Tensor:
        """The maps of one concept, ``(batch, h, w)``."""
        return self.tensor[:, self.index(concept)]

    def __len__(self) -> int:
        return len(self.concepts)

    def __repr__(self) -> str:
        return (
            f"ConceptMaps(concepts={self.concepts}, shape={tuple(self.tensor.shape)}, space={self.space!r}, "
            f"layers={self.layers}, steps={self.steps})"
        )

    def for_layers(self, layers: list[int]) -> "ConceptMaps":
        """Maps averaged over a subset of the recorded layers (needs ``per_layer``)."""
        if self.per_layer is None:
            raise ValueError("these maps carry no per-layer data")
        missing = [layer for layer in layers if layer not in self.layers]
        if missing or not layers:
            raise ValueError(f"layers {missing or layers} not among the recorded layers {self.layers}")
        positions = [self.layers.index(layer) for layer in layers]
        return ConceptMaps(
            tensor=self.per_layer[positions].mean(dim=0),
            concepts=list(self.concepts),
            layers=list(layers),
            timesteps=list(self.timesteps),
            steps=list(self.steps),
            space=self.space,
            softmax=self.softmax,
            per_layer=self.per_layer[positions],
            meta=dict(self.meta),
        )

    @property
    def is_video(self) -> bool:
        """Whether these are video maps, ``(batch, concepts, frames, h, w)``."""
        return self.tensor.dim() == 5

    def mean_over_frames(self) -> "ConceptMaps":
        """One map per video: video maps averaged over their frames, ``(batch, concepts, h, w)``.

        Averages the (already softmaxed) per-frame maps, so softmax maps still sum to one over
        concepts; per-layer maps and other spaces are averaged the same way.
        """
        if not self.is_video:
            raise ValueError("mean_over_frames() needs video maps (batch, concepts, frames, h, w)")
        averaged = ConceptMaps(
            tensor=self.tensor.mean(dim=2),
            concepts=list(self.concepts),
            layers=list(self.layers),
            timesteps=list(self.timesteps),
            steps=list(self.steps),
            space=self.space,
            softmax=self.softmax,
            per_layer=None if self.per_layer is None else self.per_layer.mean(dim=3),
            meta={**self.meta, "frames_averaged": int(self.tensor.shape[2])},
        )
        averaged.others = {space: other.mean_over_frames() for space, other in self.others.items()}
        return averaged

    # ----------------------------------------------------------------- derived
    def segment(self) -> torch.Tensor:
        """Argmax concept per patch: ``(batch, h, w)`` long (video: ``(batch, frames, h, w)``)."""
        return self.tensor.argmax(dim=1)

    def upsample(self, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        """Maps resized to ``size`` = (height, width): ``(batch, concepts, [frames,] H, W)``."""
        return viz.upsample(self.tensor, size, mode=mode)

    def normalized(self, mode: viz.Normalization = "per_concept") -> torch.Tensor:
        """Maps scaled to [0, 1]; see :func:`concept_attention.viz.normalize`."""
        return viz.normalize(self.tensor, mode)

    def to_pil(
        self,
        concept: str | int,
        batch_index: int = 0,
        size: tuple[int, int] | None = None,
        cmap: str = viz.DEFAULT_CMAP,
        normalize: viz.Normalization = "per_concept",
    ) -> Image.Image:
        """One concept's map as a coloured RGB image, optionally resized (bilinear) to ``size``."""
        values = self._normalized_for(normalize)[batch_index, self.index(concept)]
        if values.dim() != 2:
            raise ValueError("to_pil works on image maps; select a frame of video maps first")
        if size is not None:
            values = viz.upsample(values, size)
        return Image.fromarray(viz.colorize(values, cmap))

    def overlay(
        self,
        image: Image.Image | np.ndarray | torch.Tensor,
        concept: str | int,
        batch_index: int = 0,
        alpha: float = 0.8,
        cmap: str = viz.DEFAULT_CMAP,
        normalize: viz.Normalization = "per_concept",
    ) -> Image.Image:
        """The concept's heat map, bilinearly upsampled to the image size, blended over the image.

        Opacity grows with the map value (``alpha`` at the peak, ``0.35·alpha`` at the minimum), so
        the image stays readable where the concept is absent.
        """
        base = viz.to_rgb_image(image)
        values = self._normalized_for(normalize)[batch_index, self.index(concept)]
        if values.dim() != 2:
            raise ValueError("overlay works on image maps; select a frame of video maps first")
        values = viz.upsample(values, (base.height, base.width)).clamp(0, 1)
        heat = viz.colorize(values, cmap)
        return viz.blend(base, heat, alpha, weights=0.35 + 0.65 * values.numpy())

    def _normalized_for(self, mode: viz.Normalization) -> torch.Tensor:
        return viz.normalize(self.tensor, mode)

    def figure(
        self,
        image: Image.Image | np.ndarray | torch.Tensor | None = None,
        *,
        compare: "ConceptMaps | str | None" = "auto",
        batch_index: int = 0,
        alpha: float = 0.8,
        cmap: str = viz.DEFAULT_CMAP,
        normalize: viz.Normalization = "per_concept",
    ):
        """A matplotlib figure: image, one overlay per concept, argmax segmentation with legend.

        ``compare`` adds a second row: ``"auto"`` shows the raw cross-attention maps of the same run
        when they were recorded, ``"cross_attention"``/``"value"`` picks one from ``others``, a
        :class:`ConceptMaps` is drawn as given, ``None`` draws one row. ``normalize``:
        ``per_concept`` or ``global`` colour scaling.
        """
        if self.tensor.dim() != 4:
            raise ValueError("figure() draws image maps; select frames of video maps first")
        image = image if image is not None else self.image
        if image is None:
            raise ValueError("figure() needs the image: pass it or use maps with .image set")
        if compare == "auto":
            compare = self._default_compare()
        elif isinstance(compare, str):
            if compare not in self.others:
                raise ValueError(f"no {compare!r} maps recorded; available: {sorted(self.others)}")
            compare = self.others[compare]
        return viz.concept_figure(
            self, viz.to_rgb_image(image), compare=compare, batch_index=batch_index, alpha=alpha, cmap=cmap,
            normalize_mode=normalize,
        )

    # ----------------------------------------------------------------- files
    def save(
        self,
        directory: str | Path,
        image: Image.Image | np.ndarray | torch.Tensor | None = None,
        *,
        batch_index: int = 0,
        cmap: str = viz.DEFAULT_CMAP,
        alpha: float = 0.8,
        figure: bool = True,
        frames: Any = None,
        fps: float | None = None,
        video_format: str = "auto",
    ) -> Path:
        """Write the result folder.

        Always: ``<concept>.png`` heat maps (of ``batch_index``), ``maps.npz`` (float32 raw maps of
        the whole batch, per layer, and of other recorded spaces) and ``meta.json``. With an image
        (given or ``self.image``): ``image.png``, ``<concept>_overlay.png``, ``segmentation.png``
        and ``figure.png``. Video maps instead get ``<concept>.mp4`` (or ``.gif``: ``video_format``)
        with the heat map over the frames (``frames`` or ``self.frames``, else the bare heat map)
        and ``contact_sheet.png`` (a few frames × concepts); see :mod:`concept_attention.video`.
        The frames themselves go to ``frames/0000.png``, ... and the image of video maps to
        ``image.png``, so that :meth:`load` restores every field. Videos play at ``fps``, default
        the source video's (``meta["fps"]``, set by ``explain_video`` for files), else 8.
        """
        from .. import __version__

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        image = image if image is not None else self.image
        base = viz.to_rgb_image(image) if image is not None else None
        source = frames if frames is not None else self.frames
        if source is not None:
            from .. import video

            source = video.to_frames(source)
        files: dict[str, str] = {}
        for i, name in enumerate(self.concepts):
            stem = concept_filename(name)
            while stem in files.values() or stem in ("image", "segmentation", "figure", "maps", "meta"):
                stem += "_"
            files[name] = stem
            if self.tensor.dim() == 4:
                size = (base.height, base.width) if base is not None else None
                self.to_pil(i, batch_index, size=size, cmap=cmap).save(out / f"{stem}.png")
                if base is not None:
                    self.overlay(base, i, batch_index, alpha=alpha, cmap=cmap).save(out / f"{stem}_overlay.png")
        if base is not None:
            base.save(out / "image.png")
        if base is not None and self.tensor.dim() == 4:
            labels = viz.upsample(self.tensor[batch_index : batch_index + 1], (base.height, base.width)).argmax(1)[0]
            viz.segmentation_image(labels.numpy(), len(self.concepts)).save(out / "segmentation.png")
            if figure:
                import matplotlib.pyplot as plt

                drawn = self.figure(base, batch_index=batch_index, cmap=cmap)
                drawn.savefig(out / "figure.png", dpi=110)
                plt.close(drawn)
        arrays = {"maps": self.tensor.detach().cpu().float().numpy()}
        if self.per_layer is not None:
            arrays["per_layer"] = self.per_layer.detach().cpu().float().numpy()
        for space, other in self.others.items():
            arrays[f"maps__{space}"] = other.tensor.detach().cpu().float().numpy()
            if other.per_layer is not None:
                arrays[f"per_layer__{space}"] = other.per_layer.detach().cpu().float().numpy()
        video_files = None
        if self.is_video:
            from .. import video

            video_files = video.save_video_maps(
                self, out, files, source, batch_index=batch_index, fps=fps or self.meta.get("fps") or 8.0,
                video_format=video_format,
                cmap=cmap, alpha=alpha,
            )
        frame_files = None
        if source is not None:
            (out / "frames").mkdir(exist_ok=True)
            frame_files = [f"frames/{index:04d}.png" for index in range(len(source))]
            for name, frame in zip(frame_files, source):
                frame.save(out / name)
        np.savez_compressed(out / "maps.npz", **arrays)
        meta = {
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "concepts": self.concepts,
            "concept_files": files,
            "layers": self.layers,
            "timesteps": self.timesteps,
            "steps": self.steps,
            "space": self.space,
            "softmax": self.softmax,
            "shape": list(self.tensor.shape),
            "other_spaces": sorted(self.others),
            "others": {space: other._fields_meta() for space, other in sorted(self.others.items())},
            "image_size": [base.width, base.height] if base is not None else None,
            "meta": _jsonable(self.meta),
        }
        if video_files is not None:
            meta["video_files"] = video_files
        if frame_files is not None:
            meta["frame_files"] = frame_files
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
        return out

    def _fields_meta(self) -> dict[str, Any]:
        """The non-tensor fields :meth:`load` restores, as JSON."""
        return {
            "concepts": self.concepts,
            "layers": self.layers,
            "timesteps": self.timesteps,
            "steps": self.steps,
            "softmax": self.softmax,
            "meta": _jsonable(self.meta),
        }

    def _default_compare(self) -> "ConceptMaps | None":
        if self.space == "output" and "cross_attention" in self.others:
            return self.others["cross_attention"]
        return None

    @classmethod
    def load(cls, directory: str | Path) -> "ConceptMaps":
        """Restore maps written by :meth:`save` (exact float32 round-trip, image and video frames included)."""
        path = Path(directory)
        meta_path, npz_path = path / "meta.json", path / "maps.npz"
        if not meta_path.is_file() or not npz_path.is_file():
            raise FileNotFoundError(f"{path} holds no saved ConceptMaps (expected meta.json and maps.npz)")
        meta = json.loads(meta_path.read_text())
        with np.load(npz_path) as arrays:
            loaded = {key: torch.from_numpy(arrays[key].copy()) for key in arrays.files}

        def build(space: str, suffix: str, fields: dict[str, Any]) -> "ConceptMaps":
            return cls(
                tensor=loaded[f"maps{suffix}"],
                concepts=list(fields["concepts"]),
                layers=list(fields["layers"]),
                timesteps=list(fields.get("timesteps", [])),
                steps=list(fields.get("steps", [])),
                space=space,
                softmax=bool(fields.get("softmax", True)),
                per_layer=loaded.get(f"per_layer{suffix}"),
                meta=dict(fields.get("meta", {})),
            )

        maps = build(meta.get("space", "output"), "", meta)
        others = meta.get("others", {})  # per-space fields (older folders: the main ones)
        maps.others = {
            space: build(space, f"__{space}", others.get(space, meta)) for space in meta.get("other_spaces", [])
        }
        image_path = path / "image.png"
        if image_path.is_file():
            maps.image = _read_rgb(image_path)
        if "frame_files" in meta:
            maps.frames = [_read_rgb(path / name) for name in meta["frame_files"]]
        return maps


def _read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as picture:
        return picture.convert("RGB")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)
