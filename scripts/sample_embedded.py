#!/usr/bin/env python
"""Render a grid of samples of the embedded model for given captions to a PNG.

  python scripts/sample_embedded.py --ckpt checkpoints/embedded/last.pt --out /tmp/samples.png
  python scripts/sample_embedded.py --pipeline src/concept_attention/models/embedded --out s.png

Rows = captions, columns = seeds. Uses the EMA weights of a checkpoint or a saved pipeline dir.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

DEFAULT_CAPTIONS = [
    "a red circle on grass",
    "a blue square on wall",
    "a yellow triangle on sky",
    "a green cross on wall",
    "a red square and a yellow circle on sky",
    "a blue triangle and a red cross on grass",
    "a circle on sky",
    "a blue object on wall",
    "grass",
    "red",
    "",
]


def sample_grid(pipe, captions, n_per_caption=6, steps=20, cfg=3.0, seed=0, label=True):
    """uint8 grid image (rows = captions). Returns a PIL image."""
    from PIL import Image, ImageDraw

    from concept_attention.embedded import DEFAULT_SIZE, MAX_SEQUENCE_LENGTH

    rows = []
    for i, cap in enumerate(captions):
        g = torch.Generator().manual_seed(seed + i)
        kw = dict(true_cfg_scale=cfg, negative_prompt="") if cfg and cfg > 1 else {}
        out = pipe(cap, height=DEFAULT_SIZE, width=DEFAULT_SIZE, num_inference_steps=steps,
                   max_sequence_length=MAX_SEQUENCE_LENGTH, num_images_per_prompt=n_per_caption,
                   generator=g, output_type="np", **kw).images
        rows.append(np.concatenate(list((out * 255).round().clip(0, 255).astype(np.uint8)), axis=1))
    grid = np.concatenate(rows, axis=0)
    scale = 2
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    if label:
        pad = 330
        canvas = Image.new("RGB", (img.width + pad, img.height), "white")
        canvas.paste(img, (pad, 0))
        d = ImageDraw.Draw(canvas)
        for i, cap in enumerate(captions):
            d.text((4, i * DEFAULT_SIZE * scale + DEFAULT_SIZE * scale // 2 - 6), repr(cap), fill="black")
        img = canvas
    return img


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="checkpoints/embedded/last.pt")
    ap.add_argument("--pipeline", default=None, help="a saved FluxPipeline dir (instead of --ckpt)")
    ap.add_argument("--out", default="samples.png")
    ap.add_argument("--captions", nargs="*", default=None)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.pipeline:
        from concept_attention import load_pipeline
        pipe = load_pipeline(args.pipeline)
        tag = args.pipeline
    else:
        from train_embedded import load_ema_pipeline
        pipe = load_ema_pipeline(args.ckpt)
        tag = f"{args.ckpt} step {pipe.ckpt_step}"
    pipe.set_progress_bar_config(disable=True)
    img = sample_grid(pipe, args.captions if args.captions is not None else DEFAULT_CAPTIONS,
                      n_per_caption=args.n, steps=args.steps, cfg=args.cfg, seed=args.seed)
    img.save(args.out)
    print(f"wrote {args.out} ({tag})")


if __name__ == "__main__":
    main()
