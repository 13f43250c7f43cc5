"""Quality of concept maps on held-out synthetic scenes with exact masks (embedded model).

For each scene (fixed seeds, never used in training) the image is explained once per prompt
("caption" = the scene's caption, "empty" = no prompt) with every dual block recorded and the three
spaces (output = ConceptAttention, cross_attention, value) read in the same pass. Two tasks:

- colour: concepts = every colour word + every background word (grass, sky, wall);
- shape:  concepts = every shape word  + every background word.

Scores per method (argmax over concepts; background words → class 0):
- ``acc``/``mIoU``: pixel accuracy and mIoU over the 5 classes (dataset-level, as the paper);
- ``identity``: on object pixels, how often the object's own word wins among the words of its kind
  (chance = 1/4): a map that only finds "an object" scores at chance here;
- ``bin mIoU``/``bin AP``: the paper's binary protocol for the object's own word (its map thresholded
  at its mean; AP of the soft map), averaged over objects.
The "all background" row predicts class 0 everywhere.

Usage: ``python benchmarks/scenes.py [--model DIR] [--scenes 200] [--timestep 0.5] [--out results/scenes]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from concept_attention import explain, load_pipeline
from concept_attention.evaluation.metrics import ConfusionMatrix, binary_scores
from concept_attention.scenes.render import BACKGROUNDS, COLOURS, SHAPES, render_scene
from concept_attention.viz import upsample

HELD_OUT_SEED = 900_000_000
SPACES = ("output", "cross_attention", "value")


class TaskScores:
    """Accumulates argmax, identity and binary scores for one (task, method)."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.confusion = ConfusionMatrix(len(words) + 1, ignore_index=None)
        self.identity_hits = 0
        self.identity_total = 0
        self.binary_miou: list[float] = []
        self.binary_ap: list[float] = []

    def add(self, soft: torch.Tensor, scene, kind: str) -> None:
        """``soft``: (concepts, H, W) maps at image size; concepts = words then backgrounds."""
        truth = np.zeros(scene.background_mask.shape, dtype=np.int64)
        for obj in scene.objects:
            truth[obj.mask] = self.words.index(getattr(obj, kind)) + 1
        winners = soft.argmax(dim=0).numpy()
        predicted = np.where(winners < len(self.words), winners + 1, 0)
        self.confusion.update(predicted, truth)
        kind_scores = soft[: len(self.words)].numpy()
        best_word = kind_scores.argmax(axis=0)
        for obj in scene.objects:
            own = self.words.index(getattr(obj, kind))
            self.identity_hits += int((best_word[obj.mask] == own).sum())
            self.identity_total += int(obj.mask.sum())
            scores = binary_scores(soft[own].numpy(), obj.mask.astype(np.uint8), ignore_index=None)
            self.binary_miou.append(scores.miou)
            self.binary_ap.append(scores.ap)

    def summary(self) -> dict[str, float]:
        return {
            "acc": self.confusion.pixel_accuracy(),
            "miou": self.confusion.miou(),
            "identity": self.identity_hits / max(1, self.identity_total),
            "binary_miou": float(np.nanmean(self.binary_miou)) if self.binary_miou else float("nan"),
            "binary_ap": float(np.nanmean(self.binary_ap)) if self.binary_ap else float("nan"),
        }


def all_background(scene, words: list[str], kind: str) -> torch.Tensor:
    """Maps that put every pixel in the background class."""
    height, width = scene.background_mask.shape
    soft = torch.zeros(len(words) + len(BACKGROUNDS), height, width)
    soft[len(words)] = 1.0
    return soft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="pipeline directory (default: the embedded model)")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--timestep", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=1, help="noise samples per scene")
    parser.add_argument("--prompts", default="caption,empty")
    parser.add_argument("--out", default="results/scenes")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    pipe = load_pipeline(args.model)
    from concept_attention.adapters import resolve_adapter

    num_blocks = len(resolve_adapter(pipe.transformer).dual_blocks)
    blocks = list(range(num_blocks))
    tasks = {"colour": (list(COLOURS), "colour"), "shape": (list(SHAPES), "shape")}
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    methods: dict[tuple[str, str, str], TaskScores] = {}

    def scores_for(task: str, prompt: str, method: str) -> TaskScores:
        key = (task, prompt, method)
        if key not in methods:
            methods[key] = TaskScores(tasks[task][0])
        return methods[key]

    for index in range(args.scenes):
        scene = render_scene(HELD_OUT_SEED + index)
        size = scene.background_mask.shape
        for task, (words, kind) in tasks.items():
            concepts = words + list(BACKGROUNDS)
            scores_for(task, "-", "all background").add(all_background(scene, words, kind), scene, kind)
            for prompt in prompts:
                text = scene.caption if prompt == "caption" else ""
                maps = explain(pipe, scene.image, concepts, prompt=text, timestep=args.timestep,
                               num_samples=args.samples, seed=index, layers=blocks, space=list(SPACES))
                for space in SPACES:
                    space_maps = maps if space == maps.space else maps.others[space]
                    label = {"output": "ConceptAttention", "cross_attention": "concept cross-attention",
                             "value": "value space"}[space]
                    default = space_maps.for_layers(pipe_default_layers(pipe, num_blocks))
                    scores_for(task, prompt, f"{label} (default blocks)").add(
                        upsample(default.tensor[0], size), scene, kind)
                    scores_for(task, prompt, f"{label} (all blocks)").add(
                        upsample(space_maps.tensor[0], size), scene, kind)
                    if space == "output":
                        for block in blocks:
                            scores_for(task, prompt, f"ConceptAttention block {block}").add(
                                upsample(space_maps.for_layers([block]).tensor[0], size), scene, kind)
        if (index + 1) % 25 == 0:
            print(f"{index + 1}/{args.scenes} scenes, {time.perf_counter() - started:.0f} s", flush=True)

    results = {f"{t}|{p}|{m}": s.summary() for (t, p, m), s in methods.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"scenes": args.scenes, "timestep": args.timestep, "samples": args.samples, "prompts": prompts,
            "default_layers": pipe_default_layers(pipe, num_blocks), "seconds": time.perf_counter() - started,
            "model": args.model or "embedded"}
    (out / "scenes.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = render_table(methods, args)
    (out / "scenes.md").write_text(table)
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s; wrote {out}/scenes.json and scenes.md")


def pipe_default_layers(pipe, num_blocks: int) -> list[int]:
    from concept_attention.loading import pipeline_defaults

    return list(pipeline_defaults(pipe).get("layers") or range(num_blocks // 2, num_blocks))


def render_table(methods: dict, args) -> str:
    lines = [f"Held-out scenes: {args.scenes}, t = {args.timestep}, noise samples = {args.samples}.\n"]
    for task in ("colour", "shape"):
        lines.append(f"\n**{task} task** (concepts: every {task} word + grass, sky, wall; identity chance 0.25)\n")
        lines.append("| prompt | method | acc | mIoU | identity | bin mIoU | bin AP |")
        lines.append("|---|---|---|---|---|---|---|")
        for (t, prompt, method), scores in methods.items():
            if t != task:
                continue
            s = scores.summary()
            lines.append(f"| {prompt} | {method} | {s['acc']:.3f} | {s['miou']:.3f} | {s['identity']:.3f} | "
                         f"{s['binary_miou']:.3f} | {s['binary_ap']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
