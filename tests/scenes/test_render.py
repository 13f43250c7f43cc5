import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from concept_attention.scenes import (
    BACKGROUNDS, COLOURS, EXCLUDED_PAIRS, SHAPES, SIZE, caption_variants, render_scene, training_caption,
)


def test_deterministic_per_seed():
    for s in (0, 1, 12345, 999_999_999):
        a, b = render_scene(s), render_scene(s)
        assert np.array_equal(a.image, b.image)
        assert a.caption == b.caption
        for oa, ob in zip(a.objects, b.objects):
            assert np.array_equal(oa.mask, ob.mask)
    assert not np.array_equal(render_scene(0).image, render_scene(1).image)


def test_image_format_and_vocab():
    counts = {1: 0, 2: 0}
    for s in range(300):
        sc = render_scene(s)
        assert sc.image.shape == (SIZE, SIZE, 3) and sc.image.dtype == np.uint8
        assert sc.background in BACKGROUNDS
        counts[len(sc.objects)] += 1
        for o in sc.objects:
            assert o.shape in SHAPES and o.colour in COLOURS
            assert (o.colour, sc.background) not in EXCLUDED_PAIRS
            assert o.mask.dtype == bool and o.mask.shape == (SIZE, SIZE)
            # large objects: span several 4x4-pixel tokens
            assert o.mask.sum() >= 100
        if len(sc.objects) == 2:
            assert sc.objects[0].shape != sc.objects[1].shape or sc.objects[0].colour != sc.objects[1].colour
    assert 0.45 < counts[1] / 300 < 0.75


def test_masks_consistent_with_image_and_caption():
    for s in range(100):
        sc = render_scene(s)
        masks = [o.mask for o in sc.objects]
        # disjoint object masks, background = complement
        total = np.sum(masks, axis=0)
        assert total.max() <= 1
        assert np.array_equal(sc.background_mask, total == 0)
        # left-to-right order matches caption order
        xs = [o.centre[0] for o in sc.objects]
        assert xs == sorted(xs)
        expected = " and ".join(f"a {o.colour} {o.shape}" for o in sc.objects) + f" on {sc.background}"
        assert sc.caption == expected
        # mask centroid near the object centre; pixels inside the mask have the object's colour
        for o in sc.objects:
            ys, xs_ = np.nonzero(o.mask)
            assert abs(xs_.mean() - o.centre[0]) < 4 and abs(ys.mean() - o.centre[1]) < 8  # triangle centroid sits low
            inner = o.mask.copy()
            inner[1:-1, 1:-1] &= o.mask[:-2, 1:-1] & o.mask[2:, 1:-1] & o.mask[1:-1, :-2] & o.mask[1:-1, 2:]
            pix = sc.image[inner].astype(float)
            assert np.abs(pix.mean(0) - np.array(o.rgb)).max() < 3
        lab = sc.label_map()
        assert lab.max() == len(sc.objects)


def test_caption_variants():
    sc = render_scene(7)
    v = caption_variants(sc)
    assert v["full"] == [sc.caption] and v["empty"] == [""]
    assert sc.background in v["single"]
    rng = np.random.default_rng(0)
    caps = [training_caption(sc, rng) for _ in range(2000)]
    frac_full = np.mean([c == sc.caption for c in caps])
    frac_empty = np.mean([c == "" for c in caps])
    assert 0.65 < frac_full < 0.75 and 0.07 < frac_empty < 0.13
    words = {w for c in caps for w in c.split()}
    allowed = {"a", "and", "on", "object", sc.background} | {o.colour for o in sc.objects} | {
        o.shape for o in sc.objects}
    assert words <= allowed
    assert any(c in SHAPES or c in COLOURS or c in BACKGROUNDS for c in caps)  # single words occur


@pytest.mark.parametrize("seed", [3, 4])
def test_render_is_fast(seed):
    import time

    t = time.perf_counter()
    for s in range(50):
        render_scene(seed * 1000 + s)
    assert (time.perf_counter() - t) / 50 < 0.02
