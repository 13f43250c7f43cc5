#!/usr/bin/env python
"""Train the embedded model's AutoencoderKL on rendered scenes (a few minutes on CPU).

Reconstruction loss (L1 + MSE) + a tiny KL term. Afterwards the PSNR of
``vae.decode(latent_dist.mean)`` is measured on 200 held-out scenes, and ``shift_factor`` /
``scaling_factor`` are set from the latent statistics so ``(mean - shift) * scale`` has ~unit std.
Saves ``save_pretrained`` to ``checkpoints/embedded/vae`` (and ``vae_report.json``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from concept_attention.embedded import DEFAULT_SIZE, build_vae
from concept_attention.scenes import render_batch

HELDOUT_SEED_BASE = 1_000_000_000  # training seeds are < this


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def psnr(vae, n=200, bs=50, size=DEFAULT_SIZE) -> float:
    vae.eval()
    errs = []
    for i in range(0, n, bs):
        x = to_tensor(render_batch(range(HELDOUT_SEED_BASE + i, HELDOUT_SEED_BASE + min(n, i + bs)), size))
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        # PSNR on the uint8 scale, per image, then averaged
        xi = ((x + 1) * 127.5).round()
        yi = ((y + 1) * 127.5).round()
        mse = ((xi - yi) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        errs.append(10 * torch.log10(255.0 ** 2 / mse))
    vae.train()
    return float(torch.cat(errs).mean())


@torch.no_grad()
def latent_stats(vae, n=512, bs=64, size=DEFAULT_SIZE):
    vae.eval()
    zs = []
    for i in range(0, n, bs):
        x = to_tensor(render_batch(range(HELDOUT_SEED_BASE + 10_000 + i, HELDOUT_SEED_BASE + 10_000 + i + bs), size))
        zs.append(vae.encode(x).latent_dist.mean)
    z = torch.cat(zs)
    return float(z.mean()), float(z.std())


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="checkpoints/embedded/vae")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", default=None, help="continue from this VAE directory instead of a fresh one")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image size in pixels (the model's native size)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    if args.init:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.init)
    else:
        vae = build_vae(seed=args.seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    step = 0
    budget = args.minutes * 60
    while step < args.max_steps and time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        x = to_tensor(render_batch(rng.integers(0, HELDOUT_SEED_BASE, args.batch_size), args.size))
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        rec = (y - x).abs().mean() + ((y - x) ** 2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = rec + args.kl_weight * kl * x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} t={time.time() - t0:.0f}s rec={rec.item():.4f} kl/dim={kl.item():.3f} lr={lr:.2e}",
                  flush=True)
        if step % 400 == 0:
            print(f"  held-out PSNR {psnr(vae, n=100, size=args.size):.2f} dB", flush=True)

    p = psnr(vae, n=200, size=args.size)
    mean, std = latent_stats(vae, size=args.size)
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    vae.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out)
    report = dict(steps=step, seconds=time.time() - t0, psnr_heldout_200=p, latent_mean=mean, latent_std=std,
                  shift_factor=mean, scaling_factor=1.0 / std, args=vars(args))
    (out.parent / "vae_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
