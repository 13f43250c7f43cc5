"""A simple, interpretable shape scorer for generated images (one object, or one object per colour).

1. :func:`object_pixels` labels each pixel with its nearest reference colour (the four object
   colours and samples of the three backgrounds) and keeps "object" pixels; :func:`object_mask`
   returns their largest connected region.
2. :func:`shape_scores` matches that mask against each shape's template, drawn with the renderer's
   own geometry (``render._coverage``): radius from the mask area, centre from the centroid, then a
   small hill-climb over offsets (±3 px) and radius (x0.85..1.15); the score is the best IoU.
3. :func:`classify_shape` is the argmax, or ``None`` when no object region is found.
4. :func:`colour_mask` finds the region of one object colour, for images with several objects.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .render import COLOUR_RGB, COLOURS, EXCLUDED_PAIRS, SHAPES, _coverage

#: smallest object region (pixels) that counts as an object
MIN_AREA = 30
#: mask area = AREA_FACTOR[shape] * r**2 for the renderer's geometry
AREA_FACTOR = {
    "circle": np.pi,
    "square": (2 * 0.82) ** 2,
    "triangle": 1.6 ** 2 / np.sqrt(3.0),
    "cross": 2 * (2 * 0.34) * (2 * 0.95) - (2 * 0.34) ** 2,
}
#: centroid y minus centre y, in units of r (the triangle's centroid sits h/6 below its centre)
CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1.6 / 6, "cross": 0.0}
MAX_OFFSET = 3.0
SCALE_RANGE = (0.85, 1.15)
SCALE_STEP = 0.05

_GRASS = [np.array([70, 140, 45]) * f for f in (0.78, 0.89, 1.0, 1.11, 1.22)]
_SKY = [np.array([55, 115, 215]) * (1 - t) + np.array([190, 220, 245]) * t for t in np.linspace(0, 1, 6)]
_WALL = [np.full(3, g) for g in (90, 110, 130, 150, 170)]
BACKGROUND_RGB = {"grass": _GRASS, "sky": _SKY, "wall": _WALL}


def _as_rgb255(image: np.ndarray) -> np.ndarray:
    """float (H, W, 3) in 0..255 from uint8 or float-in-[0, 1] images."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] < 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    img = img[..., :3].astype(float)
    if not np.issubdtype(np.asarray(image).dtype, np.integer) and img.max(initial=0.0) <= 1.0:
        img = img * 255.0
    return img


def _nearest_reference(image: np.ndarray, background: str | None) -> tuple[np.ndarray, list[str]]:
    """Per pixel, the index of the nearest reference colour, and the object colours (the first indices)."""
    img = _as_rgb255(image)
    objects = [c for c in COLOURS if background is None or (c, background) not in EXCLUDED_PAIRS]
    backs = [rgb for refs in BACKGROUND_RGB.values() for rgb in refs]
    refs = np.array([COLOUR_RGB[c] for c in objects] + backs, float)
    dist = ((img[:, :, None, :] - refs[None, None]) ** 2).sum(-1)
    return dist.argmin(-1), objects


def _despeckle(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_opening(mask, structure=np.ones((2, 2), bool))  # drop 1-px specks and lines


def _largest_region(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(labels.shape, bool)
    sizes = np.bincount(labels.ravel())[1:]
    return ndimage.binary_fill_holes(labels == 1 + int(sizes.argmax()))


def object_pixels(image: np.ndarray, background: str | None = None) -> np.ndarray:
    """Bool (H, W): pixels whose nearest reference colour is an object colour (1-px specks removed).

    References are the object colours and samples of every background. With ``background`` given,
    object colours never used on it (EXCLUDED_PAIRS) are dropped, so e.g. bright grass is not taken
    for a green object. ``image`` is uint8 or float in [0, 1], (H, W, 3).
    """
    nearest, objects = _nearest_reference(image, background)
    return _despeckle(nearest < len(objects))


def object_mask(image: np.ndarray, background: str | None = None) -> np.ndarray:
    """Bool (H, W) mask of the largest 4-connected region of :func:`object_pixels`, holes filled
    (all False if there is none)."""
    return _largest_region(object_pixels(image, background))


def colour_mask(image: np.ndarray, colour: str, background: str | None = None) -> np.ndarray:
    """Bool (H, W): the largest region of pixels nearest to the object colour ``colour``, holes filled.

    For images with several objects of different colours: one mask per colour.
    """
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {', '.join(COLOURS)}")
    nearest, objects = _nearest_reference(image, background)
    if colour not in objects:
        return np.zeros(nearest.shape, bool)
    return _largest_region(_despeckle(nearest == objects.index(colour)))


def _template(shape: str, cx: float, cy: float, r: float, size: tuple[int, int]) -> np.ndarray:
    side = max(size)
    return (_coverage(shape, cx, cy, r, side) > 0.5)[: size[0], : size[1]]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def _fit(mask: np.ndarray, shape: str) -> float:
    """Best template IoU for ``shape``: start at the area/centroid fit, then hill-climb."""
    ys, xs = np.nonzero(mask)
    r0 = np.sqrt(xs.size / AREA_FACTOR[shape])
    x0, y0 = xs.mean() + 0.5, ys.mean() + 0.5 - CENTROID_DY[shape] * r0  # pixel centres at +0.5
    cache: dict[tuple[int, int, int], float] = {}

    def score(state: tuple[int, int, int]) -> float:
        if state not in cache:
            dx, dy, k = state
            cache[state] = _iou(mask, _template(shape, x0 + dx, y0 + dy, r0 * (1 + k * SCALE_STEP), mask.shape))
        return cache[state]

    kmax = int(round((SCALE_RANGE[1] - 1) / SCALE_STEP))
    kmin = int(round((SCALE_RANGE[0] - 1) / SCALE_STEP))
    state = (0, 0, 0)
    while True:
        dx, dy, k = state
        moves = [(dx + a, dy + b, k + c) for a, b, c in
                 ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))]
        moves = [m for m in moves if abs(m[0]) <= MAX_OFFSET and abs(m[1]) <= MAX_OFFSET and kmin <= m[2] <= kmax]
        best = max(moves, key=score)
        if score(best) <= score(state):
            return score(state)
        state = best


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """Best template IoU in [0, 1] per shape (all 0 for an empty mask)."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    if not mask.any():
        return {s: 0.0 for s in SHAPES}
    return {s: _fit(mask, s) for s in SHAPES}


def classify_shape(image_or_mask: np.ndarray, background: str | None = None) -> str | None:
    """The best-matching shape of a bool (H, W) mask or an (H, W, 3) image; ``None`` if no object is found.

    An image is first reduced to :func:`object_mask` (``background`` as there). Regions smaller than
    ``MIN_AREA`` pixels count as "no object".
    """
    arr = np.asarray(image_or_mask)
    mask = arr.astype(bool) if arr.ndim == 2 else object_mask(arr, background)
    if np.count_nonzero(mask) < MIN_AREA:
        return None
    scores = shape_scores(mask)
    return max(scores, key=scores.get)
