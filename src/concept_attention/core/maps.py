"""ConceptMaps: the typed result of a ConceptAttention run (data and tensor operations).

Pictures and files are made elsewhere: ``concept_attention.viz`` (heat maps, overlays, figures) and
``concept_attention.saving`` (result folders) register themselves as the *views* behind
:meth:`ConceptMaps.to_pil`, :meth:`~ConceptMaps.overlay`, :meth:`~ConceptMaps.figure`,
:meth:`~ConceptMaps.save` and :meth:`~ConceptMaps.load`, so this module needs neither matplotlib
nor video libraries.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from PIL import Image

Normalization = Literal["per_concept", "global", "none"]
_VIEWS: dict[str, Callable[..., Any]] = {}


def register_view(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``func(maps, *args, **kwargs)`` becomes what ``ConceptMaps.<name>(...)`` does."""
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        _VIEWS[name] = func
        return func
    return decorate


def _view(name: str) -> Callable[..., Any]:
    if name not in _VIEWS:
        raise RuntimeError(f"ConceptMaps.{name} is provided by the concept_attention package: "
                           "`import concept_attention` (not only concept_attention.core) first")
    return _VIEWS[name]


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize the last two dims of ``maps`` to ``size`` = (height, width)."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(flat, size=tuple(size), mode=mode, **kwargs)
    return out.reshape(*lead, *size)


def normalize(maps: torch.Tensor, mode: Normalization = "per_concept") -> torch.Tensor:
    """Scale ``(B, C, ..., h, w)`` maps into [0, 1].

    ``per_concept`` stretches each (image, concept) map on its own min/max, so every panel uses
    the full colour range; ``global`` uses one min/max per image across all its concepts, so
    panels are comparable with each other; ``none`` only clips to [0, 1] (useful for softmax maps,
    which already are probabilities).
    """
    maps = maps.float()
    if mode == "none":
        return maps.clamp(0, 1)
    if mode == "per_concept":
        dims = tuple(range(2, maps.dim()))
    elif mode == "global":
        dims = tuple(range(1, maps.dim()))
    else:
        raise ValueError(f"normalization must be 'per_concept', 'global' or 'none', not {mode!r}")
    low = maps.amin(dim=dims, keepdim=True)
    high = maps.amax(dim=dims, keepdim=True)
    return (maps - low) / (high - low).clamp(min=1e-12)


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
        per_layer = self.per_layer[positions]
        return self.replace(tensor=per_layer.mean(dim=0), layers=list(layers), per_layer=per_layer)

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
        return self.replace(
            tensor=self.tensor.mean(dim=2),
            per_layer=None if self.per_layer is None else self.per_layer.mean(dim=3),
            meta={**self.meta, "frames_averaged": int(self.tensor.shape[2])},
            others={space: other.mean_over_frames() for space, other in self.others.items()},
        )

    def replace(self, **changes: Any) -> "ConceptMaps":
        """A copy with ``changes`` (lists and meta copied; image, frames and other spaces dropped unless given)."""
        fields = {"concepts": list(self.concepts), "layers": list(self.layers), "timesteps": list(self.timesteps),
                  "steps": list(self.steps), "meta": dict(self.meta), "image": None, "frames": None, "others": {}}
        return dataclasses.replace(self, **{**fields, **changes})

    # ----------------------------------------------------------------- derived
    def segment(self) -> torch.Tensor:
        """Argmax concept per patch: ``(batch, h, w)`` long (video: ``(batch, frames, h, w)``)."""
        return self.tensor.argmax(dim=1)

    def upsample(self, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        """Maps resized to ``size`` = (height, width): ``(batch, concepts, [frames,] H, W)``."""
        return upsample(self.tensor, size, mode=mode)

    def normalized(self, mode: Normalization = "per_concept") -> torch.Tensor:
        """Maps scaled to [0, 1]; see :func:`normalize`."""
        return normalize(self.tensor, mode)

    def default_compare(self) -> "ConceptMaps | None":
        """The maps a figure shows beside these: the raw cross-attention maps of the same run, if recorded."""
        if self.space == "output" and "cross_attention" in self.others:
            return self.others["cross_attention"]
        return None

    # ----------------------------------------------------------------- views (concept_attention.viz / .saving)
    def to_pil(self, concept: str | int, batch_index: int = 0, size: tuple[int, int] | None = None,
               **options: Any) -> Image.Image:
        """One concept's map as a coloured RGB image, optionally resized to ``size`` (see ``viz.heat_map``)."""
        return _view("to_pil")(self, concept, batch_index, size, **options)

    def overlay(self, image: Any, concept: str | int, batch_index: int = 0, **options: Any) -> Image.Image:
        """The concept's heat map, upsampled to the image size, blended over the image (see ``viz.overlay``)."""
        return _view("overlay")(self, image, concept, batch_index, **options)

    def figure(self, image: Any = None, **options: Any) -> Any:
        """A matplotlib figure: image, one overlay per concept, argmax segmentation with legend (see ``viz.figure``)."""
        return _view("figure")(self, image, **options)

    def save(self, directory: Any, image: Any = None, **options: Any) -> Any:
        """Write the result folder (see ``concept_attention.saving.save_maps``); returns its path."""
        return _view("save")(self, directory, image, **options)

    @classmethod
    def load(cls, directory: Any) -> "ConceptMaps":
        """Restore maps written by :meth:`save` (see ``concept_attention.saving.load_maps``)."""
        return _view("load")(directory)

    def _repr_png_(self) -> bytes | None:
        """Jupyter shows the figure inline (image maps with an image only)."""
        return _view("png")(self) if "png" in _VIEWS else None
