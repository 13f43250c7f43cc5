#!/usr/bin/env python
"""Which concept wins on a held-out scene's background pixels? (ConceptAttention, the model's default blocks.)

Concepts: the four colour words and the three background words, as in the scene benchmark's colour task.
For every background pixel the argmax concept is counted as the scene's own background word, another
background word, a colour word present in the scene or an absent colour word.

  python scripts/probe_backgrounds.py --split test --scenes 100          # the embedded model
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from concept_attention import explain, load_pipeline
from concept_attention.evaluation.scenes import HELD_OUT_SEED, VALIDATION_SEED
from concept_attention.scenes.render import BACKGROUNDS, COLOURS, render_scene
from concept_attention.viz import upsample

CONCEPTS = list(COLOURS) + list(BACKGROUNDS)


def background_winners(pipe, scene, seed: int, prompt: str) -> dict[str, int]:
    """Counts of the four outcomes over one scene's background pixels."""
    maps = explain(pipe, scene.image, CONCEPTS, prompt=prompt, seed=seed, timestep=0.5)
    winner = upsample(maps.tensor[0], scene.background_mask.shape).argmax(0).numpy()[scene.background_mask]
    present = {o.colour for o in scene.objects}
    words = [CONCEPTS[i] for i in winner]
    return {"own background": sum(w == scene.background for w in words),
            "other background": sum(w in BACKGROUNDS and w != scene.background for w in words),
            "present colour": sum(w in present for w in words),
            "absent colour": sum(w in COLOURS and w not in present for w in words)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--prompt", choices=("empty", "caption"), default="empty")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.model)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    totals: dict[str, int] = {}
    for index in range(args.scenes):
        scene = render_scene((HELD_OUT_SEED if args.split == "test" else VALIDATION_SEED) + index, size)
        counts = background_winners(pipe, scene, index, scene.caption if args.prompt == "caption" else "")
        totals = {k: totals.get(k, 0) + v for k, v in counts.items()}
    pixels = sum(totals.values())
    print(f"{args.scenes} {args.split} scenes, {args.prompt} prompt, background pixels won by:")
    for name, count in totals.items():
        print(f"  {name}: {count / pixels:.2f}")


if __name__ == "__main__":
    main()
