"""Deterministic synthetic scene renderer with exact ground-truth masks.

Every scene is a function of one integer seed (``render_scene(seed)``), 64x64 RGB uint8.

Vocabulary
----------
* SHAPES: circle, square, triangle, cross (axis-aligned; triangle points up).
* COLOURS: red, green, blue, yellow (each with a slight per-object RGB jitter).
* BACKGROUNDS:
    - grass: green, smooth low-frequency texture (bilinearly upsampled coarse noise,
      no pixel noise, so it survives a VAE);
    - sky: vertical gradient, blue at the top to light blue/white at the bottom;
    - wall: grey, either plain or with faint brick mortar lines.
* Low-contrast pairs are excluded: a green object is never on grass, a blue object
  never on sky (EXCLUDED_PAIRS).

Layout: 1 object (60 %) or 2 non-overlapping objects (40 %). Objects are large: radius
18-26 px for one object, 12-17 px for two (the model sees a 16x16 token grid). Two-object
scenes have centres at least ``MIN_DX`` px apart horizontally, so "left to right" is
unambiguous. Shapes are drawn with 4x supersampling and box-downsampled; the
per-object mask is ``coverage > 0.5``; the background mask is "no object".

Caption: objects listed left to right, e.g. "a red circle and a blue square on grass".
``caption_variants`` / ``training_caption`` produce partial captions ("a circle on grass",
"a red object", "grass", "red") and the empty caption used for classifier-free guidance.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIZE = 64
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
BACKGROUNDS = ("grass", "sky", "wall")
EXCLUDED_PAIRS = frozenset({("green", "grass"), ("blue", "sky")})
ONE_OBJECT_PROB = 0.6
ONE_OBJECT_RADIUS = (18, 26)
TWO_OBJECT_RADIUS = (12, 17)
MIN_DX = 10
#: every shape lies inside the disc of radius EXTENT * r (square/triangle corners stick out of r)
EXTENT = 1.22
#: every word a caption produced by this module can contain
CAPTION_WORDS = ("a", "and", "on", "object") + SHAPES + COLOURS + BACKGROUNDS

COLOUR_RGB = {
    "red": (215, 35, 35),
    "green": (40, 185, 60),
    "blue": (35, 70, 215),
    "yellow": (235, 215, 40),
}
COLOUR_JITTER = 14


@dataclass
class SceneObject:
    shape: str
    colour: str
    mask: np.ndarray  # bool (H, W)
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float
    rgb: tuple[int, int, int] = (0, 0, 0)

    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass
class Scene:
    seed: int
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    objects: list[SceneObject]  # left to right
    background: str
    background_mask: np.ndarray  # bool (H, W)
    meta: dict = field(default_factory=dict)

    def label_map(self) -> np.ndarray:
        """int (H, W): 0 = background, i+1 = objects[i]."""
        lab = np.zeros(self.background_mask.shape, dtype=np.int64)
        for i, o in enumerate(self.objects):
            lab[o.mask] = i + 1
        return lab


# --------------------------------------------------------------------------- backgrounds
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled (cells+1)x(cells+1) uniform noise in [-1, 1], shape (size, size)."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    pos = np.linspace(0.0, cells, size, endpoint=False) + cells / size / 2
    i0 = np.clip(np.floor(pos).astype(int), 0, cells - 1)
    f = pos - i0
    f = f * f * (3 - 2 * f)  # smoothstep
    a = grid[i0][:, i0]
    b = grid[i0][:, i0 + 1]
    c = grid[i0 + 1][:, i0]
    d = grid[i0 + 1][:, i0 + 1]
    fy, fx = f[:, None], f[None, :]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _background(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    if name == "grass":
        base = np.array([70, 140, 45], float) + rng.uniform(-12, 12, 3)
        n = 0.65 * _smooth_noise(rng, size, 4) + 0.35 * _smooth_noise(rng, size, 8)
        img = base[None, None, :] * (1.0 + 0.22 * n[..., None])
    elif name == "sky":
        top = np.array([55, 115, 215], float) + rng.uniform(-12, 12, 3)
        bottom = np.array([190, 220, 245], float) + rng.uniform(-10, 10, 3)
        t = np.linspace(0.0, 1.0, size)[:, None, None] ** rng.uniform(0.8, 1.25)
        img = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).copy()
    elif name == "wall":
        g = rng.uniform(115, 160)
        img = np.full((size, size, 3), g, float) + rng.uniform(-6, 6, 3)
        if rng.random() < 0.6:  # faint bricks
            bh = int(rng.integers(8, 12))
            bw = 2 * bh
            y = np.arange(size)[:, None]
            x = np.arange(size)[None, :]
            row = y // bh
            xo = (x + (row % 2) * (bw // 2)) % bw
            mortar = (y % bh == 0) | (xo == 0)
            img[mortar] -= rng.uniform(14, 22)
    else:
        raise ValueError(f"unknown background {name!r}")
    return np.clip(img, 0, 255)


# --------------------------------------------------------------------------- shapes
def _coverage(shape: str, cx: float, cy: float, r: float, size: int, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Fractional pixel coverage in [0, 1], shape (size, size), via ss x ss supersampling."""
    # only evaluate the bounding box
    e = EXTENT * r + 1
    x0, x1 = max(0, int(np.floor(cx - e))), min(size, int(np.ceil(cx + e)))
    y0, y1 = max(0, int(np.floor(cy - e))), min(size, int(np.ceil(cy + e)))
    cov = np.zeros((size, size), float)
    if x1 <= x0 or y1 <= y0:
        return cov
    xs = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss
    ys = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss
    dx = xs[None, :] - cx
    dy = ys[:, None] - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        s = 0.82 * r
        inside = (np.abs(dx) <= s) & (np.abs(dy) <= s)
    elif shape == "triangle":
        # equilateral, pointing up, vertically centred on (cx, cy), height 1.6 r (y grows downwards)
        h = 1.6 * r
        inside = (dy <= h / 2) & (np.abs(dx) <= (dy + h / 2) / np.sqrt(3.0))
    elif shape == "cross":
        w = 0.34 * r
        L = 0.95 * r
        ax, ay = np.abs(dx), np.abs(dy)
        inside = ((ax <= w) & (ay <= L)) | ((ay <= w) & (ax <= L))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    h, w_ = y1 - y0, x1 - x0
    cov[y0:y1, x0:x1] = inside.reshape(h, ss, w_, ss).mean(axis=(1, 3))
    return cov


# --------------------------------------------------------------------------- scenes
def _caption(objects: list[SceneObject], background: str) -> str:
    return " and ".join(o.phrase() for o in objects) + f" on {background}"


def render_scene(seed: int, size: int = SIZE) -> Scene:
    """Render the scene for ``seed`` (deterministic)."""
    rng = np.random.default_rng([int(seed), 0x5CE7E])
    scale = size / SIZE
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    n_obj = 1 if rng.random() < ONE_OBJECT_PROB else 2
    allowed = [c for c in COLOURS if (c, background) not in EXCLUDED_PAIRS]

    specs = []  # (shape, colour, cx, cy, r)
    if n_obj == 1:
        r = rng.uniform(*ONE_OBJECT_RADIUS) * scale
        cx = rng.uniform(r, size - r)
        cy = rng.uniform(r, size - r)
        specs.append((SHAPES[rng.integers(4)], allowed[rng.integers(len(allowed))], cx, cy, r))
    else:
        for _ in range(1000):
            r1, r2 = rng.uniform(*TWO_OBJECT_RADIUS, size=2) * scale
            c1 = rng.uniform(r1, size - r1, size=2)
            c2 = rng.uniform(r2, size - r2, size=2)
            if np.hypot(*(c1 - c2)) > EXTENT * (r1 + r2) + 1 * scale and abs(c1[0] - c2[0]) >= MIN_DX * scale:
                break
        else:  # pragma: no cover - practically unreachable
            r1 = r2 = TWO_OBJECT_RADIUS[0] * scale
            c1 = np.array([size * 0.25, size * 0.5])
            c2 = np.array([size * 0.75, size * 0.5])
        while True:
            props = [(SHAPES[rng.integers(4)], allowed[rng.integers(len(allowed))]) for _ in range(2)]
            if props[0] != props[1]:
                break
        specs.append((*props[0], c1[0], c1[1], r1))
        specs.append((*props[1], c2[0], c2[1], r2))
    specs.sort(key=lambda s: s[2])  # left to right

    return paint_scene(rng, int(seed), background, specs, size)


def paint_scene(rng: np.random.Generator, seed: int, background: str, specs, size: int) -> Scene:
    """Draw ``specs`` = [(shape, colour, cx, cy, r), ...] (in that order) over a fresh background."""
    img = _background(rng, background, size)
    objects: list[SceneObject] = []
    for shape, colour, cx, cy, r in specs:
        rgb = np.clip(np.array(COLOUR_RGB[colour], float) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)
        cov = _coverage(shape, cx, cy, r, size)
        img = img * (1 - cov[..., None]) + rgb[None, None, :] * cov[..., None]
        objects.append(SceneObject(shape, colour, cov > 0.5, (float(cx), float(cy)), float(r),
                                   tuple(int(v) for v in rgb)))
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    bg_mask = ~np.any(np.stack([o.mask for o in objects]), axis=0)
    return Scene(seed=seed, image=image, caption=_caption(objects, background), objects=objects,
                 background=background, background_mask=bg_mask)


def render_batch(seeds, size: int = SIZE) -> np.ndarray:
    """uint8 (N, size, size, 3) images for the given seeds."""
    return np.stack([render_scene(int(s), size).image for s in seeds])


# --------------------------------------------------------------------------- captions
def partial_captions(scene: Scene) -> list[str]:
    """All partial captions of a scene (each one true of the scene, possibly incomplete)."""
    objs, bg = scene.objects, scene.background
    out = [
        " and ".join(f"a {o.shape}" for o in objs) + f" on {bg}",          # no colours
        " and ".join(f"a {o.colour} object" for o in objs) + f" on {bg}",  # no shapes
        " and ".join(o.phrase() for o in objs),                            # no background
        " and ".join(f"a {o.shape}" for o in objs),
        " and ".join(f"a {o.colour} object" for o in objs),
        bg,
    ]
    for o in objs:
        out += [
            o.phrase(), f"{o.phrase()} on {bg}", f"a {o.shape} on {bg}", f"a {o.colour} object",
            f"a {o.shape}", o.colour, o.shape, f"a {o.colour} object on {bg}",
        ]
    seen, uniq = set(), []
    for c in out:
        if c not in seen and c != scene.caption:
            seen.add(c)
            uniq.append(c)
    return uniq


def single_word_captions(scene: Scene) -> list[str]:
    words = [scene.background]
    for o in scene.objects:
        words += [o.colour, o.shape]
    return list(dict.fromkeys(words))


def training_caption(scene: Scene, rng: np.random.Generator,
                     p_full: float = 0.7, p_partial: float = 0.2) -> str:
    """Sample a training caption: full (~70 %), partial (~20 %, half of them a single word), empty (~10 %)."""
    u = rng.random()
    if u < p_full:
        return scene.caption
    if u < p_full + p_partial:
        if rng.random() < 0.4:
            words = single_word_captions(scene)
            return words[int(rng.integers(len(words)))]
        parts = partial_captions(scene)
        return parts[int(rng.integers(len(parts)))]
    return ""


def caption_variants(scene: Scene) -> dict[str, list[str]]:
    """The caption families used in training: {'full': [...], 'partial': [...], 'single': [...], 'empty': ['']}."""
    return {"full": [scene.caption], "partial": partial_captions(scene),
            "single": single_word_captions(scene), "empty": [""]}
