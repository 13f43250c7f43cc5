"""Cost of ConceptAttention in one FLUX.1 dual-stream block at real width (CPU, fp32).

One ``FluxTransformerBlock`` of FLUX.1's real size (3072 wide, 24 heads × 128) with random
weights, 512 text tokens, 10 concepts, 1024 and 4096 image tokens. Times, inside the block:

The model has two dual blocks and maps are recorded in both; block 0 is timed, i.e. a block that
records maps *and* updates the concept rows for the next block (the steady state of a real run).

- ``plain``: the unmodified block;
- ``concept``: the block with ConceptAttention installed (concept queries over [image; concept]
  keys only: r × (N + r) scores per head, running sums of maps);
- ``naive``: the same, but the concept attention is one full joint attention over
  [concepts; image] queries and keys ((N + r)² scores), as peer implementations do.

Variants are interleaved in every repetition so that ratios come from the same run. Because
end-to-end block times on a shared 2-core machine vary by several percent between repetitions,
the time spent in the concept stream itself (``FluxConceptProcessor._concept_step``: concept
projections, concept attention, scores, running sums, the concept MLP) is also timed directly;
its share of the plain block time is the overhead that does not depend on that noise.
Usage: ``python benchmarks/overhead.py [--quick] [--tokens 1024 4096] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

import concept_attention.adapters.flux as flux_adapter
import concept_attention.core.session as session_module
from concept_attention import ConceptAttention

WIDTH, HEADS, HEAD_DIM, TEXT_TOKENS, T5_DIM = 3072, 24, 128, 512, 4096


def naive_concept_attention(concept_query, concept_key, concept_value, image_key, image_value, **_):
    """Peer-style: full joint attention over [concepts; image] (image queries included), keep concept rows.

    Image queries are not exposed to the processor, so image keys stand in for them: the cost,
    which is what this benchmark measures, is the same.
    """
    query = torch.cat([concept_query, image_key], dim=1).transpose(1, 2)
    key = torch.cat([concept_key, image_key], dim=1).transpose(1, 2)
    value = torch.cat([concept_value, image_value], dim=1).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2)
    return out[:, : concept_query.shape[1]]


class PeakRSS:
    """Samples the process's resident memory in a thread; reports the peak above the start."""

    def __init__(self) -> None:
        self.peak = self.start = self._rss()
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def build_model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        num_layers=2, num_single_layers=0, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
        joint_attention_dim=T5_DIM, guidance_embeds=True,
    )
    return model.eval()


def model_inputs(tokens: int):
    from diffusers import FluxPipeline

    side = int(tokens**0.5)
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, side * side, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, T5_DIM, generator=g),
        "pooled_projections": torch.randn(1, 768, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
    }


def time_block(model, inputs, variant: str, concepts: list[str], embeds) -> tuple[float, float, float]:
    """Seconds inside the dual block, seconds inside the concept step, peak extra RSS (MiB)."""
    block = model.transformer_blocks[0]
    stamps: dict[str, float] = {"concept": 0.0}
    step = flux_adapter.FluxConceptProcessor._concept_step

    def timed_step(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return step(self, *args, **kwargs)
        finally:
            if self.block_index == 0:  # the timed block
                stamps["concept"] += time.perf_counter() - start

    flux_adapter.FluxConceptProcessor._concept_step = timed_step
    pre = block.register_forward_pre_hook(lambda m, a: stamps.__setitem__("start", time.perf_counter()))
    post = block.register_forward_hook(lambda m, a, o: stamps.__setitem__("end", time.perf_counter()))
    original = session_module.concept_attention
    try:
        with torch.inference_mode(), PeakRSS() as memory:
            if variant == "plain":
                model(**inputs)
            else:
                if variant == "naive":
                    session_module.concept_attention = naive_concept_attention
                with ConceptAttention(model, concepts, concept_embeds=embeds, layers=[0, 1]) as ca:
                    model(**inputs)
                ca.maps  # noqa: B018 (build the result as a user would)
    finally:
        session_module.concept_attention = original
        flux_adapter.FluxConceptProcessor._concept_step = step
        pre.remove()
        post.remove()
    return stamps["end"] - stamps["start"], stamps["concept"], memory.extra_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 image tokens, 2 repeats (< 2 minutes)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concepts", type=int, default=10)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = [1024], 2
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    model = build_model()
    concepts = [f"concept{i}" for i in range(args.concepts)]
    g = torch.Generator().manual_seed(1)
    embeds = [torch.randn(1, T5_DIM, generator=g) for _ in concepts]
    print(f"FLUX.1 dual block, width {WIDTH} ({HEADS}×{HEAD_DIM}), {TEXT_TOKENS} text tokens, "
          f"{len(concepts)} concepts, fp32, {torch.get_num_threads()} threads")
    print(f"{'image tokens':>12} | {'plain s':>8} | {'concept s':>9} | {'naive s':>8} | "
          f"{'concept/plain':>13} | {'naive/plain':>11} | {'concept step':>12} | {'naive step':>10} | "
          f"{'extra MiB concept':>17} | {'naive':>7}")
    variants = ("plain", "concept", "naive")
    for tokens in args.tokens:
        inputs = model_inputs(tokens)
        time_block(model, inputs, "concept", concepts, embeds)  # warm-up
        times: dict[str, list[float]] = {v: [] for v in variants}
        steps: dict[str, list[float]] = {v: [] for v in variants}
        memory: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for variant in variants:
                seconds, concept_seconds, mib = time_block(model, inputs, variant, concepts, embeds)
                times[variant].append(seconds)
                steps[variant].append(concept_seconds)
                memory[variant].append(mib)
        med = {v: statistics.median(t) for v, t in times.items()}
        step = {v: statistics.median(t) for v, t in steps.items()}
        mem = {v: statistics.median(m) - statistics.median(memory["plain"]) for v, m in memory.items()}
        print(f"{tokens:>12} | {med['plain']:>8.3f} | {med['concept']:>9.3f} | {med['naive']:>8.3f} | "
              f"{med['concept'] / med['plain'] - 1:>+12.1%} | {med['naive'] / med['plain'] - 1:>+10.1%} | "
              f"{step['concept'] / med['plain']:>11.1%} | {step['naive'] / med['plain']:>9.1%} | "
              f"{mem['concept']:>17.0f} | {mem['naive']:>7.0f}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
