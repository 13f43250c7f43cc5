"""Result folders: write and read back :class:`~concept_attention.core.maps.ConceptMaps`.

Registers the ``save`` and ``load`` views of ``ConceptMaps``. A folder holds ``<concept>.png``
heat maps (enlarged to at least ``viz.MIN_SIDE`` = 256 px on the longer side, one colour scale
for all concepts by default), ``maps.npz`` (float32 raw maps of the whole batch, per layer, and
of other recorded spaces) and ``meta.json``; with an image also ``image.png``, ``<concept>_overlay.png``,
``segmentation.png`` and ``figure.png``; video maps get one heat-map video per concept and a
contact sheet (:mod:`concept_attention.video`) and their frames under ``frames/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import viz
from ._version import __version__
from .core.maps import ConceptMaps, concept_filename, register_view

FORMAT_VERSION = 1
RESERVED_STEMS = ("image", "segmentation", "figure", "maps", "meta")


def concept_stems(concepts: list[str]) -> dict[str, str]:
    """A distinct file stem per concept (reserved names and collisions get a trailing ``_``)."""
    stems: dict[str, str] = {}
    for name in concepts:
        stem = concept_filename(name)
        while stem in stems.values() or stem in RESERVED_STEMS:
            stem += "_"
        stems[name] = stem
    return stems


@register_view("save")
def save_maps(maps: ConceptMaps, directory: str | Path, image: Image.Image | np.ndarray | torch.Tensor | None = None,
              *, batch_index: int = 0, cmap: str = viz.DEFAULT_CMAP, alpha: float = 0.8, figure: bool = True,
              frames: Any = None, fps: float | None = None, video_format: str = "auto",
              normalize: str = viz.DEFAULT_SCALE, interpolation: str = "bilinear") -> Path:
    """Write the result folder of ``maps`` (module docstring); returns its path.

    Heat maps, overlays and the segmentation are enlarged to at least :data:`viz.MIN_SIDE` pixels
    on the longer side (``image.png`` stays as it is); ``interpolation="nearest"`` draws the heat
    maps as the raw patch grid. ``normalize`` is the colour scale (``viz.SCALES``; default one
    scale for all concepts). Video maps play at ``fps``, default the source video's
    (``meta["fps"]``), else 8; ``frames`` (else ``maps.frames``) are the video under the heat maps.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    image = image if image is not None else maps.image
    base = viz.to_rgb_image(image) if image is not None else None
    stems = concept_stems(maps.concepts)
    extra: dict[str, Any] = {}
    if maps.tensor.dim() == 4:
        _write_image_files(maps, out, base, stems, batch_index,
                           dict(cmap=cmap, normalize=normalize), alpha, figure, interpolation)
    elif base is not None:
        base.save(out / "image.png")
    source = frames if frames is not None else maps.frames
    if source is not None or maps.is_video:
        extra = _write_video_files(maps, out, source, stems, batch_index, fps, video_format, cmap, alpha)
    _write_arrays(maps, out)
    meta = {**_meta(maps, stems, base), **extra}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


def _write_image_files(maps: ConceptMaps, out: Path, base: Image.Image | None, stems: dict[str, str],
                       batch_index: int, colours: dict[str, str], alpha: float, figure: bool,
                       interpolation: str) -> None:
    """``<concept>.png`` (and with an image the overlays, image, segmentation and figure), readable sizes."""
    grid = (base.height, base.width) if base is not None else tuple(maps.tensor.shape[-2:])
    size = viz.display_size(*grid)
    shown = viz.enlarged(base) if base is not None else None
    for index, name in enumerate(maps.concepts):
        heat = maps.to_pil(index, batch_index, size=size, interpolation=interpolation, **colours)
        heat.save(out / f"{stems[name]}.png")
        if shown is not None:
            maps.overlay(shown, index, batch_index, alpha=alpha, **colours).save(out / f"{stems[name]}_overlay.png")
    if base is None or shown is None:
        return
    base.save(out / "image.png")
    labels = viz.segmentation_labels(maps, batch_index, (shown.height, shown.width))
    viz.segmentation_image(labels, maps.concepts).save(out / "segmentation.png")
    if figure:
        import matplotlib.pyplot as plt

        drawn = maps.figure(base, batch_index=batch_index, **colours)
        drawn.savefig(out / "figure.png", dpi=110)
        plt.close(drawn)


def _write_video_files(maps: ConceptMaps, out: Path, source: Any, stems: dict[str, str], batch_index: int,
                       fps: float | None, video_format: str, cmap: str, alpha: float) -> dict[str, Any]:
    from . import video

    extra: dict[str, Any] = {}
    frames = video.to_frames(source) if source is not None else None
    if maps.is_video:
        extra["video_files"] = video.save_video_maps(
            maps, out, stems, frames, batch_index=batch_index, fps=fps or maps.meta.get("fps") or 8.0,
            video_format=video_format, cmap=cmap, alpha=alpha)
    if frames is not None:
        (out / "frames").mkdir(exist_ok=True)
        extra["frame_files"] = [f"frames/{index:04d}.png" for index in range(len(frames))]
        for name, frame in zip(extra["frame_files"], frames):
            frame.save(out / name)
    return extra


def _write_arrays(maps: ConceptMaps, out: Path) -> None:
    arrays = {"maps": maps.tensor.detach().cpu().float().numpy()}
    if maps.per_layer is not None:
        arrays["per_layer"] = maps.per_layer.detach().cpu().float().numpy()
    for space, other in maps.others.items():
        arrays[f"maps__{space}"] = other.tensor.detach().cpu().float().numpy()
        if other.per_layer is not None:
            arrays[f"per_layer__{space}"] = other.per_layer.detach().cpu().float().numpy()
    np.savez_compressed(out / "maps.npz", **arrays)


def _fields(maps: ConceptMaps) -> dict[str, Any]:
    """The non-tensor fields :func:`load_maps` restores, as JSON."""
    return {"concepts": maps.concepts, "layers": maps.layers, "timesteps": maps.timesteps, "steps": maps.steps,
            "softmax": maps.softmax, "meta": jsonable(maps.meta)}


def _meta(maps: ConceptMaps, stems: dict[str, str], base: Image.Image | None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION, "library_version": __version__, **_fields(maps),
        "concept_files": stems, "space": maps.space, "shape": list(maps.tensor.shape),
        "other_spaces": sorted(maps.others),
        "others": {space: _fields(other) for space, other in sorted(maps.others.items())},
        "image_size": [base.width, base.height] if base is not None else None,
    }


@register_view("load")
def load_maps(directory: str | Path) -> ConceptMaps:
    """Restore maps written by :func:`save_maps` (exact float32 round trip, image and video frames included)."""
    path = Path(directory)
    meta_path, npz_path = path / "meta.json", path / "maps.npz"
    if not meta_path.is_file() or not npz_path.is_file():
        raise FileNotFoundError(f"{path} holds no saved ConceptMaps (expected meta.json and maps.npz)")
    meta = json.loads(meta_path.read_text())
    with np.load(npz_path) as arrays:
        loaded = {key: torch.from_numpy(arrays[key].copy()) for key in arrays.files}

    def build(space: str, suffix: str, fields: dict[str, Any]) -> ConceptMaps:
        return ConceptMaps(
            tensor=loaded[f"maps{suffix}"], concepts=list(fields["concepts"]), layers=list(fields["layers"]),
            timesteps=list(fields.get("timesteps", [])), steps=list(fields.get("steps", [])), space=space,
            softmax=bool(fields.get("softmax", True)), per_layer=loaded.get(f"per_layer{suffix}"),
            meta=dict(fields.get("meta", {})))

    maps = build(meta.get("space", "output"), "", meta)
    others = meta.get("others", {})  # per-space fields (older folders: the main ones)
    maps.others = {space: build(space, f"__{space}", others.get(space, meta)) for space in meta.get("other_spaces", [])}
    if (path / "image.png").is_file():
        maps.image = _read_rgb(path / "image.png")
    if "frame_files" in meta:
        maps.frames = [_read_rgb(path / name) for name in meta["frame_files"]]
    return maps


def _read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as picture:
        return picture.convert("RGB")


def jsonable(value: Any) -> Any:
    """``value`` with every part JSON can hold kept and the rest turned into strings (1-element tensors: numbers)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)
