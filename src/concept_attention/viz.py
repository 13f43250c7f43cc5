"""Colouring, overlays and figures for concept maps (no model code here).

Registers the picture views of :class:`~concept_attention.core.maps.ConceptMaps`
(``to_pil``, ``overlay``, ``figure`` and the inline PNG for Jupyter).

Colour scales (``normalize=``): ``"shared"`` (default) draws all maps of one image on one scale,
from 0 (or the lowest value, if negative) to the highest value over all concepts, so maps of one
run can be compared by colour and a colour bar can be read; ``"global"`` is the same from the
lowest value; ``"per_concept"`` stretches every map to its own min..max; ``"none"`` is 0..1.
"""

from __future__ import annotations

import colorsys
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from .core.maps import ConceptMaps, Normalization, normalize, register_view, upsample

DEFAULT_CMAP = "inferno"
DEFAULT_SCALE = "shared"
MIN_SIDE = 256
"""Pictures of maps are enlarged (by a whole factor) until their longer side is at least this."""
MAX_COLUMNS = 6
Scale = Literal["shared", "global", "per_concept", "none"]
SCALES = ("shared", "global", "per_concept", "none")
SPACE_LABELS = {"output": "ConceptAttention", "cross_attention": "cross-attention", "value": "value space"}
__all__ = ["DEFAULT_CMAP", "DEFAULT_SCALE", "MIN_SIDE", "Normalization", "SCALES", "Scale", "blend", "colorize",
           "colour_distance", "colour_word", "concept_figure", "concept_palette", "display_size", "enlarged",
           "heat_map", "label_palette", "normalize", "overlay", "scaled_map", "segmentation_image",
           "segmentation_labels", "thing_colour", "to_rgb_image", "upsample", "value_range"]


# ---------------------------------------------------------------------------------------------- pixels
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


def display_size(height: int, width: int, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """(height, width) enlarged by the smallest whole factor that makes the longer side ≥ ``min_side``."""
    factor = max(1, math.ceil(min_side / max(1, height, width)))
    return height * factor, width * factor


def enlarged(image: Image.Image, min_side: int = MIN_SIDE) -> Image.Image:
    """``image`` resized (Lanczos) to :func:`display_size`, or itself when it is large enough."""
    height, width = display_size(image.height, image.width, min_side)
    return image if (height, width) == (image.height, image.width) else image.resize((width, height), Image.LANCZOS)


# ---------------------------------------------------------------------------------------------- colour scales
def value_range(maps: ConceptMaps, batch_index: int = 0, concept: str | int | None = None,
                normalize: str = DEFAULT_SCALE) -> tuple[float, float]:
    """The (low, high) map values drawn as the colour map's ends (see the module docstring).

    ``per_concept`` needs ``concept``; the other scales are the same for every concept of an image.
    """
    if normalize not in SCALES:
        raise ValueError(f"normalization must be one of {', '.join(map(repr, SCALES))}, not {normalize!r}")
    if normalize == "none":
        return 0.0, 1.0
    values = maps.tensor[batch_index].float()
    if normalize == "per_concept":
        if concept is None:
            raise ValueError("a per-concept scale needs the concept")
        values = values[maps.index(concept)]
    low, high = float(values.min()), float(values.max())
    if normalize == "shared":
        low = min(0.0, low)
    return low, max(high, low + 1e-12)


def scaled_map(maps: ConceptMaps, concept: str | int, batch_index: int = 0,
               normalize: str = DEFAULT_SCALE) -> torch.Tensor:
    """One concept's map ``(h, w)`` (video: ``(frames, h, w)``) scaled to [0, 1] by :func:`value_range`."""
    low, high = value_range(maps, batch_index, concept, normalize)
    values = maps.tensor[batch_index, maps.index(concept)].float()
    return ((values - low) / (high - low)).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- palette
COLOUR_WORDS: dict[str, tuple[int, int, int]] = {  # the basic ones are the Tableau colours of the palette
    "red": (214, 39, 40), "orange": (255, 127, 14), "yellow": (240, 200, 20), "green": (44, 160, 44),
    "blue": (31, 119, 180), "purple": (148, 103, 189), "violet": (150, 80, 220), "pink": (227, 119, 194),
    "brown": (140, 86, 75), "black": (25, 25, 25), "white": (240, 240, 240), "gray": (127, 127, 127),
    "grey": (127, 127, 127), "cyan": (23, 190, 207), "magenta": (210, 30, 170), "teal": (0, 128, 128),
    "navy": (20, 30, 120), "gold": (212, 160, 0), "silver": (185, 185, 195), "maroon": (120, 20, 30),
    "lime": (130, 220, 40), "olive": (128, 128, 20), "turquoise": (64, 210, 195), "indigo": (75, 20, 140),
    "beige": (225, 205, 160), "tan": (205, 170, 125), "crimson": (200, 20, 60), "lavender": (180, 160, 230),
    "coral": (250, 120, 85), "salmon": (245, 140, 115), "aqua": (40, 220, 230), "azure": (40, 130, 240),
    "scarlet": (240, 40, 20), "amber": (255, 180, 0), "khaki": (195, 185, 110),
}
THING_COLOURS: dict[str, tuple[int, int, int]] = {  # things whose colour readers expect (after colour words)
    "grass": (44, 160, 44), "lawn": (44, 160, 44), "leaf": (60, 150, 50), "leaves": (60, 150, 50),
    "tree": (30, 110, 45), "forest": (30, 110, 45), "sky": (120, 180, 235), "water": (30, 100, 190),
    "sea": (30, 100, 190), "ocean": (30, 100, 190), "lake": (30, 100, 190), "river": (30, 100, 190),
    "sun": (245, 200, 30), "sand": (220, 190, 130), "beach": (220, 190, 130), "desert": (220, 190, 130),
    "snow": (225, 228, 238), "cloud": (215, 218, 228), "fire": (250, 110, 20), "flame": (250, 110, 20),
    "dirt": (120, 80, 50), "soil": (120, 80, 50), "mud": (120, 80, 50), "wood": (150, 100, 60),
}
_LIGHTER = ("light", "pale", "pastel", "bright")
_DARKER = ("dark", "deep")
_BASE_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5", "#dbdb8d", "#393b79",
    "#637939", "#8c6d31", "#843c39", "#7b4173",
)


def _mix(rgb: Sequence[float], other: Sequence[float], amount: float) -> tuple[int, int, int]:
    r, g, b = (round((1 - amount) * a + amount * o) for a, o in zip(rgb, other))
    return int(r), int(g), int(b)


def colour_word(name: str) -> tuple[int, int, int] | None:
    """The RGB colour a concept name asks for ("red", "dark blue", "reddish"), or None."""
    words = re.findall(r"[a-z]+", name.lower())
    for word in words:
        stems = [word] + ([word[:-3], word[:-4]] if word.endswith("ish") else [])
        rgb = next((COLOUR_WORDS[stem] for stem in stems if stem in COLOUR_WORDS), None)
        if rgb is None:
            continue
        if any(word in _LIGHTER for word in words):
            return _mix(rgb, (255, 255, 255), 0.45)
        if any(word in _DARKER for word in words):
            return _mix(rgb, (0, 0, 0), 0.4)
        return rgb
    return None


def thing_colour(name: str) -> tuple[int, int, int] | None:
    """The colour readers expect for a thing ("grass": green, "sky": light blue, "clouds"), or None."""
    for word in re.findall(r"[a-z]+", name.lower()):
        for stem in (word, word[:-1] if word.endswith("s") else word):
            if stem in THING_COLOURS:
                return THING_COLOURS[stem]
    return None


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 ``(..., 3)`` to CIE L*a*b* (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def colour_distance(rgb: Sequence[int], others: Sequence[Sequence[int]]) -> np.ndarray:
    """CIE94 colour differences (symmetric chroma weights) between ``rgb`` and each of ``others``."""
    a, b = _lab(np.asarray(rgb)), _lab(np.asarray(others).reshape(-1, 3))
    chroma_a, chroma_b = np.hypot(a[1], a[2]), np.hypot(b[:, 1], b[:, 2])
    chroma = np.sqrt(chroma_a * chroma_b)
    d_chroma = chroma_a - chroma_b
    d_hue2 = np.maximum(((a[1:] - b[:, 1:]) ** 2).sum(-1) - d_chroma ** 2, 0.0)
    return np.sqrt((a[0] - b[:, 0]) ** 2 + (d_chroma / (1 + 0.045 * chroma)) ** 2
                   + d_hue2 / (1 + 0.015 * chroma) ** 2)


def _candidates(count: int) -> list[tuple[int, int, int]]:
    """Tableau colours, then golden-angle hues over several saturations and values (no near-whites)."""
    found = [tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in _BASE_COLOURS]
    index = 0
    while len(found) < count:
        hue = (index * 0.6180339887) % 1.0
        saturation = (0.8, 0.5, 0.95)[index % 3]
        value = (0.9, 0.6, 0.75, 0.45)[(index // 3) % 4]
        rgb = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))
        if rgb not in found:
            found.append(rgb)
        index += 1
    return found  # type: ignore[return-value]


def _distinct_colours(count: int, taken: Sequence[tuple[int, int, int]] = ()) -> list[tuple[int, int, int]]:
    """``count`` colours, in a fixed order, as far apart (CIE94) from each other and ``taken`` as can be."""
    candidates = _candidates(max(200, 4 * (count + len(taken))))
    chosen: list[tuple[int, int, int]] = []
    used = set(taken)
    threshold = 20.0
    while len(chosen) < count:
        for rgb in candidates:
            if len(chosen) == count:
                break
            if rgb in used:
                continue
            others = list(taken) + chosen
            if not others or colour_distance(rgb, others).min() >= threshold:
                chosen.append(rgb)
                used.add(rgb)
        threshold *= 0.75
    return chosen


def _shade(rgb: tuple[int, int, int], taken: Sequence[tuple[int, int, int]]) -> tuple[int, int, int]:
    """``rgb`` or, when it (or one close to it) is taken, a darker or lighter shade of it."""
    for amount in (0.0, 0.35, -0.4, 0.55, -0.6, 0.7, -0.75):
        shade = _mix(rgb, (0, 0, 0) if amount > 0 else (255, 255, 255), abs(amount))
        if not taken or colour_distance(shade, taken).min() >= 8.0:
            return shade
    return _distinct_colours(1, taken)[0]


def concept_palette(concepts: Sequence[str]) -> np.ndarray:
    """One distinct RGB colour (uint8, ``(len(concepts), 3)``) per concept, for any number of concepts.

    Concepts named after a colour ("red", "dark blue", "reddish car") get that colour, then things with
    a typical colour ("grass", "sky") theirs (a shade of it when taken); the others get well-separated
    colours that stay clear of those.
    """
    colours: list[tuple[int, int, int] | None] = [None] * len(concepts)
    taken: list[tuple[int, int, int]] = []
    for lookup in (colour_word, lambda name: None if colour_word(name) else thing_colour(name)):
        for index, name in enumerate(concepts):
            wanted = lookup(name)
            if wanted is not None and colours[index] is None:
                colours[index] = _shade(wanted, taken)
                taken.append(colours[index])  # type: ignore[arg-type]
    rest = iter(_distinct_colours(colours.count(None), taken))
    filled = [colour if colour is not None else next(rest) for colour in colours]
    return np.asarray(filled, dtype=np.uint8).reshape(len(concepts), 3)


def label_palette(num_labels: int) -> np.ndarray:
    """Distinct RGB colours (uint8, ``(num_labels, 3)``) for unnamed labels; see :func:`concept_palette`."""
    return np.asarray(_distinct_colours(num_labels), dtype=np.uint8).reshape(num_labels, 3)


def _palette(concepts: int | Sequence[str]) -> np.ndarray:
    return label_palette(concepts) if isinstance(concepts, int) else concept_palette(concepts)


# ---------------------------------------------------------------------------------------------- segmentation
def segmentation_labels(maps: ConceptMaps, batch_index: int, size: tuple[int, int]) -> np.ndarray:
    """The argmax concept per pixel, ``(height, width)``, of the maps bilinearly upsampled to ``size``."""
    return upsample(maps.tensor[batch_index: batch_index + 1], size).argmax(dim=1)[0].numpy()


def segmentation_image(labels: np.ndarray, concepts: int | Sequence[str]) -> Image.Image:
    """Colour an (H, W) label array with exactly the legend's colours (:func:`concept_palette` of the
    concept names, or :func:`label_palette` of a label count); nothing is blended in."""
    return Image.fromarray(_palette(concepts)[np.asarray(labels, dtype=np.int64)])


# ---------------------------------------------------------------------------------------------- views
@register_view("to_pil")
def heat_map(maps: ConceptMaps, concept: str | int, batch_index: int = 0, size: tuple[int, int] | None = None,
             cmap: str = DEFAULT_CMAP, normalize: str = DEFAULT_SCALE,
             interpolation: str = "bilinear") -> Image.Image:
    """One concept's map as a coloured RGB image, optionally resized to ``size`` = (height, width).

    ``interpolation``: ``"bilinear"`` (smooth) or ``"nearest"`` (the raw patch grid, blocky).
    """
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', not {interpolation!r}")
    values = scaled_map(maps, concept, batch_index, normalize)
    if values.dim() != 2:
        raise ValueError("to_pil works on image maps; select a frame of video maps first")
    if size is not None:
        values = upsample(values, size, mode=interpolation).clamp(0, 1)
    return Image.fromarray(colorize(values, cmap))


@register_view("overlay")
def overlay(maps: ConceptMaps, image: Image.Image | np.ndarray | torch.Tensor, concept: str | int,
            batch_index: int = 0, alpha: float = 0.8, cmap: str = DEFAULT_CMAP,
            normalize: str = DEFAULT_SCALE) -> Image.Image:
    """The concept's heat map, bilinearly upsampled to the image size, blended over the image.

    Opacity grows with the map value (``alpha`` at the top of the colour scale, ``0.35·alpha`` at
    its bottom), so the image stays readable where the concept is absent.
    """
    base = to_rgb_image(image)
    values = scaled_map(maps, concept, batch_index, normalize)
    if values.dim() != 2:
        raise ValueError("overlay works on image maps; select a frame of video maps first")
    values = upsample(values, (base.height, base.width)).clamp(0, 1)
    return blend(base, colorize(values, cmap), alpha, weights=0.35 + 0.65 * values.numpy())


@register_view("figure")
def figure(maps: ConceptMaps, image: Image.Image | np.ndarray | torch.Tensor | None = None, *,
           compare: "ConceptMaps | str | None" = "auto", batch_index: int = 0, alpha: float = 0.8,
           cmap: str = DEFAULT_CMAP, normalize: str = DEFAULT_SCALE) -> Any:
    """A matplotlib figure: image, segmentations and legend, then one overlay per concept per space.

    ``compare`` adds a second block: ``"auto"`` shows the raw cross-attention maps of the same run
    when they were recorded, ``"cross_attention"``/``"value"`` picks one from ``others``, a
    :class:`ConceptMaps` is drawn as given, ``None`` draws one block. ``normalize``: ``shared``
    (default: one colour scale per block, with a colour bar), ``global``, ``per_concept`` or ``none``.
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


# ---------------------------------------------------------------------------------------------- figure layout
@dataclass
class _Layout:
    """Where the figure's parts go, in inches from the top-left corner."""

    concepts: list[str]
    blocks: int
    panel: float
    font: float = 8.0
    gap: float = 0.12
    title: float = 0.3
    strip_title: float = 0.42
    left: float = 0.45
    right: float = 0.15
    bar: float = 0.16
    bar_room: float = 0.85
    top: float = 0.1
    note: float = 0.0
    columns: int = 1
    width: float = 0.0
    legend_box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    legend_columns: int = 1
    block_tops: list[float] = field(default_factory=list)
    height: float = 0.0

    def __post_init__(self) -> None:
        count = len(self.concepts)
        self.columns = max(1, min(MAX_COLUMNS, count))
        strip = (1 + self.blocks) * (self.panel + self.gap)
        entry, line = self._legend_entry()
        content = max(self.grid_width + self.gap + self.bar + self.bar_room, strip + entry)
        self.width = self.left + content + self.right
        y = self.top + self.note + self.strip_title + self.panel + self.gap
        per_column = max(1, int((self.strip_title + self.panel) // line) - 1)  # a line for the title
        beside = content - strip
        if math.ceil(count / per_column) * entry <= beside + 1e-6:
            self.legend_columns = math.ceil(count / per_column)
            self.legend_box = (self.left + strip, self.top + self.note, beside, self.strip_title + self.panel)
        else:
            self.legend_columns = max(1, min(count, int(content // entry)))
            rows = math.ceil(count / self.legend_columns)
            self.legend_box = (self.left, y, content, rows * line + 0.1)
            y += rows * line + 0.1 + self.gap
        for _ in range(self.blocks):
            self.block_tops.append(y + 0.1)
            y += 0.1 + self.rows * (self.title + self.panel + self.gap)
        self.height = y + 0.05

    @property
    def grid_width(self) -> float:
        return self.columns * self.panel + (self.columns - 1) * self.gap

    @property
    def rows(self) -> int:
        return math.ceil(len(self.concepts) / self.columns)

    def _legend_entry(self) -> tuple[float, float]:
        """(width, height) in inches of one legend entry with the longest name."""
        from matplotlib.textpath import TextPath

        longest = max((TextPath((0, 0), _short(name, 40), size=self.font).get_extents().width
                       for name in self.concepts), default=0.0)
        return (longest + 4.2 * self.font) / 72.0, 1.75 * self.font / 72.0

    def strip_panel(self, index: int) -> tuple[float, float, float, float]:
        """(x, y, width, height) of the image (0) and segmentation (1…) panels."""
        top = self.top + self.note + self.strip_title
        return self.left + index * (self.panel + self.gap), top, self.panel, self.panel

    def map_panel(self, block: int, index: int) -> tuple[float, float, float, float]:
        row, column = divmod(index, self.columns)
        y = self.block_tops[block] + row * (self.title + self.panel + self.gap) + self.title
        return self.left + column * (self.panel + self.gap), y, self.panel, self.panel

    def colour_bar(self, block: int) -> tuple[float, float, float, float]:
        x = self.left + self.grid_width + self.gap
        span = self.rows * (self.title + self.panel + self.gap) - self.gap - self.title
        return x, self.block_tops[block] + self.title, self.bar, min(span, 2 * self.panel + self.title)

    def rect(self, box: tuple[float, float, float, float]) -> list[float]:
        """An inches box as matplotlib's [left, bottom, width, height] in figure fractions."""
        x, y, w, h = box
        return [x / self.width, 1.0 - (y + h) / self.height, w / self.width, h / self.height]


def _short(name: str, limit: int) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _use_agg_without_display() -> None:
    import os

    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo") and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")


def concept_figure(
    maps: ConceptMaps,
    image: Image.Image,
    *,
    compare: ConceptMaps | None = None,
    batch_index: int = 0,
    alpha: float = 0.8,
    cmap: str = DEFAULT_CMAP,
    normalize_mode: str = DEFAULT_SCALE,
    panel_size: float = 2.2,
) -> Any:
    """A matplotlib figure of one image's maps (layout in :class:`_Layout`).

    Top: the image, one segmentation per block in the legend's exact colours, the complete legend.
    Then one block per space (``maps``, then ``compare``): an overlay per concept in at most
    :data:`MAX_COLUMNS` columns, with the block's colour bar. Axes are labelled (``ax.get_label()``):
    ``"image"``, ``"segmentation:<space>"``, ``"legend"``, ``"map:<space>:<concept>"``, ``"colorbar:<space>"``.
    """
    _use_agg_without_display()
    import matplotlib.pyplot as plt

    blocks = [maps] if compare is None else [maps, compare]
    if any(block.concepts != maps.concepts for block in blocks):
        raise ValueError("compare maps must have the same concepts as the maps")
    value_range(maps, batch_index, 0, normalize_mode)  # checks the mode before drawing
    notes = figure_notes(maps, normalize_mode)
    layout = _Layout(list(maps.concepts), len(blocks), panel_size, note=0.3 * len(notes))
    drawn = plt.figure(figsize=(layout.width, layout.height))
    base = enlarged(to_rgb_image(image))
    palette = concept_palette(maps.concepts)
    _draw_strip(drawn, layout, blocks, base, palette, batch_index)
    for block, block_maps in enumerate(blocks):
        _draw_block(drawn, layout, block, block_maps, base, batch_index, alpha, cmap, normalize_mode)
    for line, note in enumerate(notes):
        drawn.text(0.5, 1.0 - (layout.top + 0.12 + 0.3 * line) / layout.height, note,
                   ha="center", va="center", fontsize=9, style="italic", wrap=True)
    return drawn


def figure_notes(maps: ConceptMaps, normalize_mode: str) -> list[str]:
    """Lines printed above a figure: the model's notice (``maps.meta["model_notice"]``) and the per-map scale."""
    notes = [str(maps.meta["model_notice"])] if maps.meta.get("model_notice") else []
    if normalize_mode == "per_concept":
        notes.append("per-map scale: every map is stretched to its own min–max (shown in its title), so colours "
                     "are not comparable between maps")
    return notes


def _draw_strip(drawn: Any, layout: _Layout, blocks: list[ConceptMaps], base: Image.Image,
                palette: np.ndarray, batch_index: int) -> None:
    """The image, one exact-colour segmentation per block, and the legend."""
    from matplotlib.patches import Patch

    ax = drawn.add_axes(layout.rect(layout.strip_panel(0)), label="image")
    ax.imshow(base)
    ax.set_title("image", fontsize=9)
    ax.axis("off")
    for index, block_maps in enumerate(blocks, start=1):
        labels = segmentation_labels(block_maps, batch_index, (base.height, base.width))
        ax = drawn.add_axes(layout.rect(layout.strip_panel(index)), label=f"segmentation:{block_maps.space}")
        ax.imshow(palette[labels], interpolation="nearest")
        name = SPACE_LABELS.get(block_maps.space, block_maps.space)
        ax.set_title("segmentation" if len(blocks) == 1 else f"segmentation\n{name}", fontsize=9)
        ax.axis("off")
    ax = drawn.add_axes(layout.rect(layout.legend_box), label="legend")
    ax.axis("off")
    handles = [Patch(facecolor=tuple(palette[i] / 255.0), edgecolor="0.55", linewidth=0.5, label=_short(name, 40))
               for i, name in enumerate(layout.concepts)]
    ax.legend(handles=handles, loc="upper left", ncol=layout.legend_columns, fontsize=layout.font, frameon=False,
              borderaxespad=0.0, title="concept = segmentation colour", title_fontsize=layout.font,
              alignment="left", columnspacing=1.2, handlelength=1.6)


def _draw_block(drawn: Any, layout: _Layout, block: int, block_maps: ConceptMaps, base: Image.Image,
                batch_index: int, alpha: float, cmap: str, normalize_mode: str) -> None:
    """One overlay per concept (wrapped in rows) and the block's colour bar and name."""
    space = block_maps.space
    name = SPACE_LABELS.get(space, space)
    for index, concept in enumerate(block_maps.concepts):
        ax = drawn.add_axes(layout.rect(layout.map_panel(block, index)), label=f"map:{space}:{concept}")
        ax.imshow(block_maps.overlay(base, index, batch_index, alpha=alpha, cmap=cmap, normalize=normalize_mode))
        title = _short(concept, int(layout.panel * 72 / (9 * 0.6)))
        if normalize_mode == "per_concept":
            low, high = value_range(block_maps, batch_index, index, normalize_mode)
            title = f"{_short(concept, 16)} ({low:.2f}–{high:.2f})"
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    x, y, _, _ = layout.map_panel(block, 0)
    height = layout.rows * (layout.title + layout.panel + layout.gap) - layout.gap - layout.title
    drawn.text(0.5 * layout.left / layout.width, 1.0 - (y + 0.5 * min(height, 2 * layout.panel)) / layout.height,
               name, rotation=90, ha="center", va="center", fontsize=10)
    _draw_colour_bar(drawn, layout, block, block_maps, batch_index, cmap, normalize_mode)


def _draw_colour_bar(drawn: Any, layout: _Layout, block: int, block_maps: ConceptMaps, batch_index: int,
                     cmap: str, normalize_mode: str) -> None:
    """The block's colour bar: map values (one scale for the block), or min..max of each map."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cax = drawn.add_axes(layout.rect(layout.colour_bar(block)), label=f"colorbar:{block_maps.space}")
    kind = "probability" if block_maps.softmax else "value"
    if normalize_mode == "per_concept":
        bar = drawn.colorbar(ScalarMappable(Normalize(0.0, 1.0), colormaps[cmap]), cax=cax, ticks=[0.0, 1.0])
        bar.ax.set_yticklabels(["min", "max"])
        bar.set_label(f"{kind}, each map's own range", fontsize=8)
    else:
        low, high = value_range(block_maps, batch_index, None, normalize_mode)
        bar = drawn.colorbar(ScalarMappable(Normalize(low, high), colormaps[cmap]), cax=cax)
        bar.set_label(kind, fontsize=8)
    bar.ax.tick_params(labelsize=7)
