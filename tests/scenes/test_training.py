"""Training data of the embedded model: scenes with 1-3 objects, order-free captions, binding targets."""
import collections

import numpy as np
import pytest

from concept_attention.embedded import MAX_SEQUENCE_LENGTH, build_t5_tokenizer
from concept_attention.scenes import render_scene
from concept_attention.scenes.render import BACKGROUNDS, COLOURS, EXCLUDED_PAIRS, SHAPES
from concept_attention.scenes.training import (
    COLOUR_TO_SHAPE, SHAPE_TO_COLOUR, TARGET_CLASSES, render_training_scene, sample_caption, scene_object,
    word_regions,
)


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    scenes = [render_training_scene(seed) for seed in range(400)]
    return [(scene, sample_caption(scene, rng)) for scene in scenes]


def test_scenes_have_one_to_three_separate_objects(samples):
    counts = collections.Counter(len(scene.objects) for scene, _ in samples)
    assert set(counts) == {1, 2, 3}
    assert 0.2 < counts[1] / 400 < 0.4 and 0.15 < counts[3] / 400 < 0.35
    distinct = 0
    for scene, _ in samples:
        masks = np.stack([o.mask for o in scene.objects])
        assert masks.sum(axis=0).max() <= 1 and np.array_equal(scene.background_mask, masks.sum(axis=0) == 0)
        assert all(o.mask.sum() >= 60 for o in scene.objects)
        assert all((o.colour, scene.background) not in EXCLUDED_PAIRS for o in scene.objects)
        properties = [(o.shape, o.colour) for o in scene.objects]
        assert len(set(properties)) == len(properties)
        if len(scene.objects) > 1:
            distinct += len({o.colour for o in scene.objects}) == len({o.shape for o in scene.objects}) == len(properties)
    several = sum(len(scene.objects) > 1 for scene, _ in samples)
    assert distinct / several > 0.75
    a, b = render_training_scene(5), render_training_scene(5)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption


def test_training_scenes_are_not_the_held_out_renderer():
    assert not np.array_equal(render_training_scene(900_000_000).image, render_scene(900_000_000).image)


def test_caption_kinds_and_word_order_is_random(samples):
    kinds = collections.Counter(caption.kind for _, caption in samples)
    assert set(kinds) == {"full", "binding", "partial", "empty"}
    assert 0.35 < kinds["full"] / 400 < 0.6 and 0.2 < kinds["binding"] / 400 < 0.45
    first_is_left = []
    for scene, caption in samples:
        words = set(caption.text.split())
        allowed = {"a", "and", "on", "object", scene.background} | {o.colour for o in scene.objects} | {
            o.shape for o in scene.objects}
        assert words <= allowed
        if caption.kind == "full" and len(scene.objects) > 1:
            assert sorted(caption.text.split(" on ")[0].split(" and ")) == sorted(o.phrase() for o in scene.objects)
            first_is_left.append(caption.text.startswith(scene.objects[0].phrase()))
    assert 0.25 < np.mean(first_is_left) < 0.75  # the caption's order does not follow the layout


def test_binding_targets_point_at_their_own_object(samples):
    tokenizer = build_t5_tokenizer()
    modes = collections.Counter()
    for scene, caption in samples:
        ids = tokenizer(caption.text).input_ids
        assert len(ids) == len(caption.text.split()) + 1 <= MAX_SEQUENCE_LENGTH  # one token per word, + </s>
        if caption.kind != "binding":
            assert caption.targets == ()
            continue
        assert len(caption.targets) == len(scene.objects)
        for target in caption.targets:
            word = caption.text.split()[target.position]
            assert ids[target.position] == tokenizer(word, add_special_tokens=False).input_ids[0]
            obj = scene_object(scene, target, caption.text)
            if target.kind == COLOUR_TO_SHAPE:
                assert word in COLOURS and TARGET_CLASSES[target.kind][target.label] == obj.shape
                assert "object" in caption.text and not set(caption.text.split()) & set(SHAPES)
            else:
                assert word in SHAPES and TARGET_CLASSES[target.kind][target.label] == obj.colour
                assert not set(caption.text.split()) & set(COLOURS)
            modes[target.kind] += 1
    assert modes[COLOUR_TO_SHAPE] > 50 and modes[SHAPE_TO_COLOUR] > 50
    assert set(TARGET_CLASSES) == {COLOUR_TO_SHAPE, SHAPE_TO_COLOUR}
    assert all(bg in BACKGROUNDS for bg in {scene.background for scene, _ in samples})


def test_word_regions_name_each_words_own_object_or_the_background(samples):
    named = collections.Counter()
    for scene, caption in samples:
        words = caption.text.split()
        for index, mask in word_regions(scene, caption.text):
            word = words[index]
            if word in BACKGROUNDS:
                assert word == scene.background and np.array_equal(mask, scene.background_mask)
                named["background"] += 1
                continue
            owner = next(o for o in scene.objects if o.mask is mask)
            assert word in (owner.colour, owner.shape)
            neighbours = {w for w in words[max(0, index - 1):index + 2] if w in COLOURS or w in SHAPES}
            assert all(w in (owner.colour, owner.shape) for w in neighbours)  # "a red circle": both words, one object
            named[caption.kind] += 1
    assert named["background"] > 50 and named["full"] > 100 and named["binding"] > 50 and named["partial"] > 5


def test_word_regions_leave_out_words_that_fit_several_objects():
    scene = next(s for s in (render_training_scene(seed) for seed in range(500))
                 if len(s.objects) == 2 and s.objects[0].colour == s.objects[1].colour)
    first, second = scene.objects
    caption = f"a {first.colour} {first.shape} and a {second.colour} {second.shape} on {scene.background}"
    regions = dict(word_regions(scene, caption))
    assert regions[1] is first.mask and regions[2] is first.mask and regions[5] is second.mask
    assert 1 not in dict(word_regions(scene, f"a {first.colour} object"))  # two red objects: no region
    assert dict(word_regions(scene, "a cat on mars")) == {}
