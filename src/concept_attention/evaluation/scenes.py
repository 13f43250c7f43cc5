"""Held-out synthetic scenes of the embedded model as a segmentation data set (exact masks).

Two tasks, both open-vocabulary within their kind: ``colour`` (classes = every colour word) and
``shape`` (classes = every shape word). The class of an object pixel is its object's colour (or
shape) word; background pixels are class 0. Background concepts are the scene background words
(grass, sky, wall), all mapped to class 0. Scenes come from fixed seeds far from the training
seeds' range, so the set is the same on every machine.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..scenes.render import BACKGROUNDS, COLOURS, SHAPES, render_scene
from .datasets import SegmentationSample, select_indices

HELD_OUT_SEED = 900_000_000
"""First seed of the held-out test scenes.

The embedded model's training draws scene seeds uniformly from [0, 10⁹): in its first 25,000 steps
none is among the first 200 seeds of this split or of :data:`VALIDATION_SEED`'s (checked), and the
extra seeds of ``--two-object-frac`` skip both splits' first million."""
VALIDATION_SEED = 800_000_000
"""First seed of the scenes for choosing settings (default blocks, timestep): never the test scenes."""


class SceneSegmentation:
    """``count`` held-out scenes as :class:`SegmentationSample` with class indices per word."""

    def __init__(self, task: str = "colour", count: int = 200, *, limit: int | None = None,
                 shard_index: int = 0, num_shards: int = 1, first_seed: int = HELD_OUT_SEED) -> None:
        if task not in ("colour", "shape"):
            raise ValueError(f"task must be 'colour' or 'shape', not {task!r}")
        self.task = task
        self.words = list(COLOURS if task == "colour" else SHAPES)
        self.background = list(BACKGROUNDS)
        self.first_seed = first_seed
        self._positions = select_indices(count, limit, shard_index, num_shards)

    @property
    def num_classes(self) -> int:
        return len(self.words) + 1

    def __len__(self) -> int:
        return len(self._positions)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> SegmentationSample:
        seed = self.first_seed + self._positions[i]
        scene = render_scene(seed)
        mask = np.zeros(scene.background_mask.shape, dtype=np.uint8)
        for obj in scene.objects:
            word = obj.colour if self.task == "colour" else obj.shape
            mask[obj.mask] = self.words.index(word) + 1
        return SegmentationSample(
            id=f"scene-{seed}",
            image=Image.fromarray(scene.image),
            mask=mask,
            class_names=list(self.words),
            class_indices=list(range(1, len(self.words) + 1)),
            meta={"caption": scene.caption, "background": scene.background, "seed": seed,
                  "objects": [{"shape": o.shape, "colour": o.colour} for o in scene.objects]},
        )

    def default_background(self) -> list[str]:
        return list(self.background)


def scene_sample_prompt(sample: SegmentationSample, mode: str) -> str:
    """The prompt used with a scene: its caption (``"caption"``) or nothing (``"empty"``)."""
    return sample.meta["caption"] if mode == "caption" else ""

