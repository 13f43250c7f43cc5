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
        alpha: float = 0.5,
        cmap: str = viz.DEFAULT_CMAP,
        normalize: viz.Normalization = "per_concept",
    ) -> Image.Image:
        """The concept's heat map, bilinearly upsampled to the image size, blended over it."""
        base = viz.to_rgb_image(image)
        heat = self.to_pil(concept, batch_index, size=(base.height, base.width), cmap=cmap, normalize=normalize)
        return viz.blend(base, np.asarray(heat), alpha)

    def _normalized_for(self, mode: viz.Normalization) -> torch.Tensor:
        return viz.normalize(self.tensor, mode)

    # ----------------------------------------------------------------- files
    def save(self, directory: str | Path, batch_index: int = 0, cmap: str = viz.DEFAULT_CMAP) -> Path:
        """Write ``<concept>.png`` heat maps (of ``batch_index``), ``maps.npz`` and ``meta.json``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for i, name in enumerate(self.concepts):
            stem = concept_filename(name)
            while stem in files.values():
                stem += "_"
            files[name] = stem
            if self.tensor.dim() == 4:
                self.to_pil(i, batch_index, cmap=cmap).save(out / f"{stem}.png")
        arrays = {"maps": self.tensor.detach().cpu().float().numpy()}
        if self.per_layer is not None:
            arrays["per_layer"] = self.per_layer.detach().cpu().float().numpy()
        np.savez_compressed(out / "maps.npz", **arrays)
        meta = {
            "format_version": FORMAT_VERSION,
            "concepts": self.concepts,
            "concept_files": files,
            "layers": self.layers,
            "timesteps": self.timesteps,
            "steps": self.steps,
            "space": self.space,
            "softmax": self.softmax,
            "shape": list(self.tensor.shape),
            **{"meta": _jsonable(self.meta)},
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> "ConceptMaps":
        """Restore maps written by :meth:`save` (exact float32 round-trip)."""
        path = Path(directory)
        meta_path, npz_path = path / "meta.json", path / "maps.npz"
        if not meta_path.is_file() or not npz_path.is_file():
            raise FileNotFoundError(f"{path} holds no saved ConceptMaps (expected meta.json and maps.npz)")
        meta = json.loads(meta_path.read_text())
        with np.load(npz_path) as arrays:
            tensor = torch.from_numpy(arrays["maps"].copy())
            per_layer = torch.from_numpy(arrays["per_layer"].copy()) if "per_layer" in arrays else None
        return cls(
            tensor=tensor,
            concepts=list(meta["concepts"]),
            layers=list(meta["layers"]),
            timesteps=list(meta.get("timesteps", [])),
            steps=list(meta.get("steps", [])),
            space=meta.get("space", "output"),
            softmax=bool(meta.get("softmax", True)),
            per_layer=per_layer,
            meta=dict(meta.get("meta", {})),
        )


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
