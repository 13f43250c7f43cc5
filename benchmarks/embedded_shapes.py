"""Cost of the embedded model's structural choices: one training step (forward + backward) of the transformer
for several dual/single block splits and T5 lengths, measured in one run (ratios, not absolutes).

  python benchmarks/embedded_shapes.py [--rounds 3] [--batch 32]

The shipped embedded model (v2) uses 4 dual + 2 single blocks and T5 length 16; v1 used 5 + 1 and 32.
Rounds alternate the configurations so that load from other processes hits all of them alike.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

CONFIGS = {"5 dual + 1 single, T5 32 (v1)": (5, 1, 32), "5 dual + 1 single, T5 16": (5, 1, 16),
           "4 dual + 2 single, T5 16 (v2)": (4, 2, 16), "4 dual + 3 single, T5 16": (4, 3, 16)}


def step_seconds(model: torch.nn.Module, batch: int, text: int) -> float:
    """Seconds of one forward + backward on random inputs shaped as the embedded model's training batch."""
    ids = torch.zeros(256, 3)
    ids[:, 1], ids[:, 2] = torch.arange(256) // 16, torch.arange(256) % 16
    inputs = dict(hidden_states=torch.randn(batch, 256, 32), timestep=torch.rand(batch),
                  pooled_projections=torch.zeros(batch, 64), encoder_hidden_states=torch.randn(batch, text, 64),
                  txt_ids=torch.zeros(text, 3), img_ids=ids, return_dict=False)
    started = time.perf_counter()
    model(**inputs)[0].square().mean().backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from concept_attention.embedded import build_transformer

    models = {name: build_transformer(0, num_layers=dual, num_single_layers=single)
              for name, (dual, single, _) in CONFIGS.items()}
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for name, model in models.items():  # warm-up
        step_seconds(model, args.batch, CONFIGS[name][2])
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(step_seconds(model, args.batch, CONFIGS[name][2]))
    base = min(times[next(iter(CONFIGS))])
    print(f"transformer forward + backward, batch {args.batch}, 256 image tokens, best of {args.rounds} rounds")
    print("| blocks, T5 length | parameters | seconds | relative to v1 |")
    print("|---|---|---|---|")
    for name, model in models.items():
        best = min(times[name])
        count = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {count:.2f} M | {best:.2f} | {best / base:.2f} |")


if __name__ == "__main__":
    main()
