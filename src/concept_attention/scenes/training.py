"""Training data of the embedded model (v2): scenes with 1-3 objects, order-free captions, binding targets.

The held-out scenes (:func:`render_scene`) stay as they are; training draws its own scenes here:

* :func:`render_training_scene`: 1, 2 or 3 non-overlapping objects (30 / 45 / 25 %); in most
  scenes with several objects every object has its own colour and its own shape, so a word can
  only be tied to one object by looking at the image.
* :func:`sample_caption`: captions name the objects in a **random order**, so word order says
  nothing about where an object is, and come in four kinds:

  - ``full``: "a blue square and a red circle on grass";
  - ``binding``: only one attribute per object, "a red object and a blue object on grass" or
    "a square and a circle on grass". Each colour word gets a *binding target*, its object's
    shape (each shape word: its object's colour). A small head reads the word's text state after
    each dual block and must predict the target; the word can only know it by finding its own
    object in the image, which is what ConceptAttention later reads. The head is dropped at export;
    no map is ever a training target;
  - ``partial``: a random subset of the objects, or a single word;
  - ``empty`` (for classifier-free guidance).

Captions use one token per word in the embedded tokenizer, so a word's index is its T5 position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import BACKGROUNDS, COLOURS, EXCLUDED_PAIRS, EXTENT, ONE_OBJECT_RADIUS, SHAPES, SIZE, TWO_OBJECT_RADIUS, \
    Scene, SceneObject, paint_scene

OBJECT_COUNT_PROBS = (0.30, 0.45, 0.25)
THREE_OBJECT_RADIUS = (10, 13)
DISTINCT_PROB = 0.85
CAPTION_KIND_PROBS = {"full": 0.45, "binding": 0.35, "partial": 0.10, "empty": 0.10}
#: a binding target reads a colour word and predicts its object's shape, or the reverse
COLOUR_TO_SHAPE, SHAPE_TO_COLOUR = 0, 1
TARGET_CLASSES = {COLOUR_TO_SHAPE: SHAPES, SHAPE_TO_COLOUR: COLOURS}


@dataclass(frozen=True)
class BindingTarget:
    """Word at T5 position ``position`` must predict class ``label`` of ``TARGET_CLASSES[kind]``."""

    position: int
    kind: int
    label: int


@dataclass(frozen=True)
class TrainingCaption:
    text: str
    kind: str
    targets: tuple[BindingTarget, ...] = ()


def _placements(rng: np.random.Generator, count: int, radius: tuple[float, float], size: int):
    """``count`` non-overlapping (cx, cy, r), by rejection; ``None`` if none is found."""
    scale = size / SIZE
    for _ in range(200):
        radii = rng.uniform(*radius, size=count) * scale
        centres = [rng.uniform(r, size - r, size=2) for r in radii]
        if all(np.hypot(*(centres[i] - centres[j])) > EXTENT * (radii[i] + radii[j]) + scale
               for i in range(count) for j in range(i)):
            return [(c[0], c[1], r) for c, r in zip(centres, radii)]
    return None


def _properties(rng: np.random.Generator, count: int, colours: list[str]) -> list[tuple[str, str]]:
    """(shape, colour) per object: all distinct colours and shapes (mostly), else pairwise different."""
    if count > 1 and count <= len(colours) and rng.random() < DISTINCT_PROB:
        shapes = rng.permutation(SHAPES)[:count]
        picked = rng.permutation(colours)[:count]
        return [(str(s), str(c)) for s, c in zip(shapes, picked)]
    while True:
        props = [(SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))]) for _ in range(count)]
        if len(set(props)) == count:
            return props


def render_training_scene(seed: int, size: int = SIZE) -> Scene:
    """A training scene with 1-3 objects (deterministic in ``seed``); objects listed left to right."""
    rng = np.random.default_rng([int(seed), 0x7A1E2])
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    colours = [c for c in COLOURS if (c, background) not in EXCLUDED_PAIRS]
    count = int(rng.choice(3, p=OBJECT_COUNT_PROBS)) + 1
    radius = (ONE_OBJECT_RADIUS, TWO_OBJECT_RADIUS, THREE_OBJECT_RADIUS)[count - 1]
    places = _placements(rng, count, radius, size)
    while places is None:  # pragma: no cover - rare: fall back to one object fewer
        count -= 1
        places = _placements(rng, count, (ONE_OBJECT_RADIUS, TWO_OBJECT_RADIUS)[count - 1], size)
    specs = [(shape, colour, cx, cy, r) for (shape, colour), (cx, cy, r)
             in zip(_properties(rng, count, colours), places)]
    specs.sort(key=lambda spec: spec[2])
    return paint_scene(rng, int(seed), background, specs, size)


def _join(phrases: list[str], background: str | None) -> str:
    return " and ".join(phrases) + (f" on {background}" if background else "")


def _binding_caption(scene: Scene, rng: np.random.Generator) -> TrainingCaption | None:
    """Colour-only or shape-only caption with one target per object; ``None`` if the attribute repeats."""
    objects = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    modes = [COLOUR_TO_SHAPE, SHAPE_TO_COLOUR] if rng.random() < 0.5 else [SHAPE_TO_COLOUR, COLOUR_TO_SHAPE]
    background = scene.background if rng.random() < 0.8 else None
    for mode in modes:
        named = [o.colour if mode == COLOUR_TO_SHAPE else o.shape for o in objects]
        if len(set(named)) < len(named):
            continue
        phrases = [f"a {o.colour} object" if mode == COLOUR_TO_SHAPE else f"a {o.shape}" for o in objects]
        targets, position = [], 1  # the word after "a"
        for obj, phrase in zip(objects, phrases):
            answer = obj.shape if mode == COLOUR_TO_SHAPE else obj.colour
            targets.append(BindingTarget(position, mode, TARGET_CLASSES[mode].index(answer)))
            position += len(phrase.split()) + 1  # the phrase and "and"
        return TrainingCaption(_join(phrases, background), "binding", tuple(targets))
    return None


def _partial_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A true but incomplete caption: a single word, or a random subset of the objects in random order."""
    if rng.random() < 0.4:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        return (obj.colour, obj.shape, scene.background)[int(rng.integers(3))]
    count = int(rng.integers(1, len(scene.objects) + 1))
    objects = [scene.objects[i] for i in rng.permutation(len(scene.objects))[:count]]
    return _join([o.phrase() for o in objects], scene.background if rng.random() < 0.5 else None)


def full_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Every object with colour and shape, in a random order, and the background."""
    order = rng.permutation(len(scene.objects))
    return _join([scene.objects[i].phrase() for i in order], scene.background)


def sample_caption(scene: Scene, rng: np.random.Generator, probs: dict[str, float] = CAPTION_KIND_PROBS
                   ) -> TrainingCaption:
    """One training caption for ``scene`` (kinds and frequencies in the module docstring)."""
    kind = str(rng.choice(list(probs), p=list(probs.values())))
    if kind == "binding":
        caption = _binding_caption(scene, rng)
        if caption is not None:
            return caption
        kind = "full"
    if kind == "full":
        return TrainingCaption(full_caption(scene, rng), "full")
    if kind == "partial":
        return TrainingCaption(_partial_caption(scene, rng), "partial")
    return TrainingCaption("", "empty")


def word_regions(scene: Scene, caption: str) -> list[tuple[int, np.ndarray]]:
    """``(word index, mask)`` for each word of ``caption`` that names exactly one region of ``scene``: a colour or
    shape word -> the one object its phrase (the run of colour and shape words around it) fits; the scene's
    background word -> the background. Used only by the optional attention-grounding objective."""
    words = caption.split()
    regions = []
    for index, word in enumerate(words):
        if word in BACKGROUNDS and word == scene.background:
            regions.append((index, scene.background_mask))
        elif word in COLOURS or word in SHAPES:
            phrase = _attribute_run(words, index)
            owners = [o for o in scene.objects if all(w in (o.colour, o.shape) for w in phrase)]
            if len(owners) == 1:
                regions.append((index, owners[0].mask))
    return regions


def _attribute_run(words: list[str], index: int) -> list[str]:
    """The colour and shape words next to each other around ``words[index]``."""
    start, end = index, index + 1
    while start > 0 and (words[start - 1] in COLOURS or words[start - 1] in SHAPES):
        start -= 1
    while end < len(words) and (words[end] in COLOURS or words[end] in SHAPES):
        end += 1
    return words[start:end]


def scene_object(scene: Scene, target: BindingTarget, caption: str) -> SceneObject:
    """The object a binding target's word names (for tests and diagnostics)."""
    word = caption.split()[target.position]
    attribute = "colour" if target.kind == COLOUR_TO_SHAPE else "shape"
    return next(o for o in scene.objects if getattr(o, attribute) == word)
