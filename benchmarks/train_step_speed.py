"""Embedded-model training speed: eager vs ``torch.compile``d transformer, measured in one run.

One fixed training batch (``scripts/train_embedded.py``'s data, loss and AdamW step); the two
variants alternate in rounds so that load from other processes hits both alike. Reports seconds
per step of each and their ratio (compile warm-up excluded and reported apart).

  python benchmarks/train_step_speed.py --rounds 3 --steps 5
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae", default=str(ROOT / "checkpoints" / "embedded" / "vae"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from train_embedded import flow_loss, load_models, make_batch, trainable_params

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = load_models(args.vae, seed=0)
    pipe.transformer.train()
    params = [p for p in trainable_params(pipe) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    images, captions = make_batch(0, 0, args.batch_size)
    eager = pipe.transformer
    compiled = torch.compile(eager)

    def step(module) -> float:
        pipe.transformer = module
        start = time.perf_counter()
        loss = flow_loss(pipe, images, captions, generator=torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    start = time.perf_counter()
    step(compiled)
    step(compiled)  # the backward graph compiles on the first call, recompiles may follow
    warmup = time.perf_counter() - start
    step(eager)
    times = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name, module in (("eager", eager), ("compiled", compiled)):
            times[name] += [step(module) for _ in range(args.steps)]
    pipe.transformer = eager
    per_step = {k: sum(v) / len(v) for k, v in times.items()}
    print(f"batch {args.batch_size}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps each")
    print(f"compile warm-up (2 steps): {warmup:.1f} s")
    for name, value in per_step.items():
        print(f"{name:>9}: {value:.3f} s/step  (min {min(times[name]):.3f}, max {max(times[name]):.3f})")
    print(f"compiled / eager time per step: {per_step['compiled'] / per_step['eager']:.3f}")


if __name__ == "__main__":
    main()
