"""The two-object judge of benchmarks/generated_shapes.py, checked on renderer scenes (ground truth known)."""

from __future__ import annotations

import numpy as np
import pytest

from concept_attention.scenes.render import render_scene
from repo_scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/generated_shapes.py", "benchmark_generated_shapes")


def two_object_scenes(count: int):
    out, i = [], 0
    while len(out) < count:
        scene = render_scene(900_100_000 + i)
        i += 1
        a, b = scene.objects if len(scene.objects) == 2 else (None, None)
        if a is not None and a.colour != b.colour and a.shape != b.shape:
            out.append(scene)
    return out


def test_pair_captions_are_valid_and_fixed(bench):
    pairs = bench.pair_captions(30)
    assert pairs == bench.pair_captions(30) and len(set(pairs)) == 30
    for c1, s1, c2, s2, background in pairs:
        assert c1 != c2 and s1 != s2
        assert (c1, background) not in bench.EXCLUDED_PAIRS and (c2, background) not in bench.EXCLUDED_PAIRS


def test_judge_pair_on_renderer_scenes(bench):
    scenes = two_object_scenes(20)
    right = [bench.judge_pair(s.image, s.objects[0].colour, s.objects[0].shape, s.objects[1].colour,
                              s.objects[1].shape, s.background) for s in scenes]
    summary = bench.summarise_pairs(right)
    assert summary["both_colours"] == 1.0 and summary["order_right_of_both"] == 1.0
    assert summary["bound"] >= 0.9
    # the same images judged against the captions with the two objects swapped: order and binding fail
    swapped = [bench.judge_pair(s.image, s.objects[1].colour, s.objects[1].shape, s.objects[0].colour,
                                s.objects[0].shape, s.background) for s in scenes]
    assert bench.summarise_pairs(swapped)["order_right_of_both"] == 0.0
    # ... and with the shapes swapped between the colours
    crossed = [bench.judge_pair(s.image, s.objects[0].colour, s.objects[1].shape, s.objects[1].colour,
                                s.objects[0].shape, s.background) for s in scenes]
    assert bench.summarise_pairs(crossed)["bound"] <= 0.1
    # an image with one colour missing
    blank = np.full_like(scenes[0].image, 128)
    judged = bench.judge_pair(blank, "red", "circle", "blue", "square", "wall")
    assert not judged["both_colours"] and not judged["bound"]
