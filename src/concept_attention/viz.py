"""Colouring, overlays and figures for concept maps (no model code here).

Registers the picture views of :class:`~concept_attention.core.maps.ConceptMaps`
(``to_pil``, ``overlay``, ``figure`` and the inline PNG for Jupyter).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from .core.maps import ConceptMaps, Normalization, normalize, register_view, upsample

DEFAULT_CMAP = "inferno"
__all__ = ["DEFAULT_CMAP", "Normalization", "blend", "colorize", "concept_figure", "heat_map", "label_palette",
           "normalize", "overlay", "segmentation_image", "to_rgb_image", "upsample"]


def colorize(values: np.ndarray | torch.Tensor, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Map a 2-D array in [0, 1] to an RGB uint8 image with a matplotlib colour map."""
    from matplotlib import colormaps

    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    rgba = colormaps[cmap](np.clip(values, 0.0, 1.0))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def to_rgb_image(image: Image.Image | np.ndarray | torch.Tensor) -> Image.Image:
    """Best-effort conversion of a pipeline output image to an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().float().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
    else:
        array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(array, 0.0, 1.0) * 255.0 + 0.5
        array = array.astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(array[..., :3])


def blend(image: Image.Image, heat: np.ndarray, alpha: float = 0.5, weights: np.ndarray | None = None) -> Image.Image:
    """Alpha-blend an RGB uint8 heat map (same size as ``image``) over ``image``.

    With ``weights`` (H, W in [0, 1]) the opacity is ``alpha * weights`` per pixel, so the image
    stays visible where the map is low and the heat colour covers it where the map is high.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    opacity = alpha if weights is None else (alpha * np.clip(weights, 0.0, 1.0))[..., None]
    mixed = (1.0 - opacity) * base + opacity * heat.astype(np.float32)
    return Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8))


def label_palette(num_labels: int) -> np.ndarray:
    """Distinct RGB colours (uint8, ``(num_labels, 3)``) for segmentation labels."""
    from matplotlib import colormaps

    name = "tab10" if num_labels <= 10 else "tab20"
    cmap = colormaps[name]
    colours = [cmap(i % cmap.N)[:3] for i in range(num_labels)]
    return (np.asarray(colours) * 255.0 + 0.5).astype(np.uint8)


def segmentation_image(labels: np.ndarray, num_labels: int) -> Image.Image:
    """Colour an (H, W) integer label array with :func:`label_palette`."""
    palette = label_palette(num_labels)
    return Image.fromarray(palette[np.asarray(labels, dtype=np.int64)])


def concept_figure(
    maps: "ConceptMaps",  # noqa: F821
    image: Image.Image,
    *,
    compare: "ConceptMaps | None" = None,  # noqa: F821
    batch_index: int = 0,
    alpha: float = 0.8,
    cmap: str = DEFAULT_CMAP,
    normalize_mode: Normalization = "per_concept",
    panel_size: float = 2.2,
):
    """A matplotlib figure: the image, one overlay per concept, the argmax segmentation with a legend.

    With ``compare`` (e.g. the raw cross-attention maps of the same run), a second row shows
    those maps the same way, as the paper's figures do.
    """
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo") and not _has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [maps] if compare is None else [maps, compare]
    concepts = maps.concepts
    columns = len(concepts) + 2
    figure, axes = plt.subplots(
        len(rows), columns, figsize=(panel_size * columns, panel_size * len(rows) + 0.4), squeeze=False
    )
    base = to_rgb_image(image)
    size = (base.height, base.width)
    palette = label_palette(len(concepts))
    for row, row_maps in enumerate(rows):
        label = {"output": "ConceptAttention", "cross_attention": "cross-attention", "value": "value space"}.get(
            row_maps.space, row_maps.space
        )
        ax = axes[row][0]
        ax.imshow(base)
        ax.set_title("image" if row == 0 else "", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if row > 0:
            ax.imshow(np.full((*size, 3), 255, dtype=np.uint8))
            ax.set_frame_on(False)
        for column, concept in enumerate(concepts):
            ax = axes[row][column + 1]
            ax.imshow(row_maps.overlay(base, concept, batch_index, alpha=alpha, cmap=cmap, normalize=normalize_mode))
            ax.set_title(concept, fontsize=9)
            ax.axis("off")
        labels = upsample(row_maps.tensor[batch_index : batch_index + 1], size).argmax(dim=1)[0].numpy()
        ax = axes[row][-1]
        ax.imshow(blend(base, palette[labels], 0.6))
        ax.set_title("segmentation", fontsize=9)
        ax.axis("off")
        if row == 0:
            handles = [Patch(color=palette[i] / 255.0, label=name) for i, name in enumerate(concepts)]
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    figure.tight_layout()
    return figure


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY"))


@register_view("to_pil")
def heat_map(maps: ConceptMaps, concept: str | int, batch_index: int = 0, size: tuple[int, int] | None = None,
             cmap: str = DEFAULT_CMAP, normalize: Normalization = "per_concept") -> Image.Image:
    """One concept's map as a coloured RGB image, optionally resized (bilinear) to ``size``."""
    values = _normalized(maps, normalize)[batch_index, maps.index(concept)]
    if values.dim() != 2:
        raise ValueError("to_pil works on image maps; select a frame of video maps first")
    if size is not None:
        values = upsample(values, size)
    return Image.fromarray(colorize(values, cmap))


@register_view("overlay")
def overlay(maps: ConceptMaps, image: Image.Image | np.ndarray | torch.Tensor, concept: str | int,
            batch_index: int = 0, alpha: float = 0.8, cmap: str = DEFAULT_CMAP,
            normalize: Normalization = "per_concept") -> Image.Image:
    """The concept's heat map, bilinearly upsampled to the image size, blended over the image.

    Opacity grows with the map value (``alpha`` at the peak, ``0.35·alpha`` at the minimum), so
    the image stays readable where the concept is absent.
    """
    base = to_rgb_image(image)
    values = _normalized(maps, normalize)[batch_index, maps.index(concept)]
    if values.dim() != 2:
        raise ValueError("overlay works on image maps; select a frame of video maps first")
    values = upsample(values, (base.height, base.width)).clamp(0, 1)
    return blend(base, colorize(values, cmap), alpha, weights=0.35 + 0.65 * values.numpy())


def _normalized(maps: ConceptMaps, mode: Normalization) -> torch.Tensor:
    return normalize(maps.tensor, mode)


@register_view("figure")
def figure(maps: ConceptMaps, image: Image.Image | np.ndarray | torch.Tensor | None = None, *,
           compare: "ConceptMaps | str | None" = "auto", batch_index: int = 0, alpha: float = 0.8,
           cmap: str = DEFAULT_CMAP, normalize: Normalization = "per_concept") -> Any:
    """A matplotlib figure: image, one overlay per concept, argmax segmentation with legend.

    ``compare`` adds a second row: ``"auto"`` shows the raw cross-attention maps of the same run
    when they were recorded, ``"cross_attention"``/``"value"`` picks one from ``others``, a
    :class:`ConceptMaps` is drawn as given, ``None`` draws one row. ``normalize``:
    ``per_concept`` or ``global`` colour scaling.
    """
    if maps.tensor.dim() != 4:
        raise ValueError("figure() draws image maps; select frames of video maps first")
    image = image if image is not None else maps.image
    if image is None:
        raise ValueError("figure() needs the image: pass it or use maps with .image set")
    if compare == "auto":
        compare = maps.default_compare()
    elif isinstance(compare, str):
        if compare not in maps.others:
            raise ValueError(f"no {compare!r} maps recorded; available: {sorted(maps.others)}")
        compare = maps.others[compare]
    return concept_figure(maps, to_rgb_image(image), compare=compare, batch_index=batch_index, alpha=alpha,
                          cmap=cmap, normalize_mode=normalize)


@register_view("png")
def figure_png(maps: ConceptMaps) -> bytes | None:
    """The figure as PNG bytes (what Jupyter shows for a ConceptMaps), or None without an image."""
    if maps.image is None or maps.tensor.dim() != 4:
        return None
    import matplotlib.pyplot as plt

    drawn = figure(maps)
    buffer = io.BytesIO()
    drawn.savefig(buffer, format="png", dpi=80)
    plt.close(drawn)
    return buffer.getvalue()
