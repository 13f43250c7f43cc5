"""Colouring, upsampling and overlays for concept maps (no model code here)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Normalization = Literal["per_concept", "global", "none"]
DEFAULT_CMAP = "inferno"


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
