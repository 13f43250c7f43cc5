"""Cost of ConceptAttention in one FLUX.1 dual-stream block at real width (CPU fp32, or a CUDA GPU in bf16).

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
the time spent in the concept stream itself (``FluxConceptProcessor._concept_step`` and the concept
row update it returns: concept projections, concept attention, scores, the concept MLP) is also
timed directly; its share of the plain block time is the overhead that does not depend on that
noise. ``GEMMs`` is the part of it spent in the text-stream linear layers on the concept rows (the
second read of those weights: modulation, q/k/v, output projection, MLP).

On a CUDA machine (``--device auto``, the default, picks it) the model runs in bf16 on the GPU and
every time is read from CUDA events; memory is the peak of ``torch.cuda.max_memory_allocated``
above the start instead of the process's resident memory.
Usage: ``python benchmarks/overhead.py [--quick] [--tokens 1024 4096] [--repeats 3] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

import concept_attention.adapters.flux as flux_adapter
import concept_attention.core.session as session_module
from concept_attention import ConceptAttention

WIDTH, HEADS, HEAD_DIM, TEXT_TOKENS, T5_DIM = 3072, 24, 128, 512, 4096
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


class Clock:
    """Time stamps: ``perf_counter`` on the CPU, CUDA events on a GPU (read after one synchronize)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def stamp(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, spans: list[tuple[Any, Any]]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in spans) / 1000
        return sum(end - start for start, end in spans)


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


class PeakCUDA:
    """The peak of allocated GPU memory above the start."""

    def __enter__(self) -> "PeakCUDA":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.extra_mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20


def build_model(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        num_layers=2, num_single_layers=0, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
        joint_attention_dim=T5_DIM, guidance_embeds=True,
    )
    if device.type != "cpu" or dtype != torch.float32:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def model_inputs(tokens: int, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
    from diffusers import FluxPipeline

    side = int(tokens**0.5)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, side * side, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, T5_DIM, generator=g),
        "pooled_projections": torch.randn(1, 768, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
    }
    floating = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
    return {k: v.to(device=device, dtype=dtype if k in floating else v.dtype) for k, v in inputs.items()}


def text_stream_linears(block) -> list[torch.nn.Module]:
    """The text-stream linear layers a concept row goes through in a dual block."""
    attn = block.attn
    return [block.norm1_context.linear, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out,
            block.ff_context.net[0].proj, block.ff_context.net[2]]


def timed_concept_step(spans: dict[str, list], clock: Clock, state: dict[str, bool]):
    """``FluxConceptProcessor._concept_step`` timed in block 0, with the concept-row update it returns."""
    step = flux_adapter.FluxConceptProcessor._concept_step

    def timed(run):
        state["concept"] = True
        start = clock.stamp()
        try:
            return run()
        finally:
            spans["concept"].append((start, clock.stamp()))
            state["concept"] = False

    def timed_step(self, *args, **kwargs):
        if self.block_index != 0:  # the timed block
            return step(self, *args, **kwargs)
        update = timed(lambda: step(self, *args, **kwargs))
        return None if update is None else (lambda: timed(update))

    return step, timed_step


def time_block(model, inputs, variant: str, concepts: list[str], embeds, clock: Clock) -> tuple[float, ...]:
    """Seconds inside the dual block, in the concept step, in its text-stream GEMMs; peak extra memory (MiB)."""
    block = model.transformer_blocks[0]
    spans: dict[str, list] = {"block": [], "concept": [], "gemm": []}
    state = {"concept": False}
    pending: list[Any] = []
    step, timed_step = timed_concept_step(spans, clock, state)
    handles = [block.register_forward_pre_hook(lambda m, a: pending.append(clock.stamp())),
               block.register_forward_hook(lambda m, a, o: spans["block"].append((pending.pop(), clock.stamp())))]
    for linear in text_stream_linears(block):
        handles.append(linear.register_forward_pre_hook(
            lambda m, a: pending.append(clock.stamp()) if state["concept"] else None))
        handles.append(linear.register_forward_hook(
            lambda m, a, o: spans["gemm"].append((pending.pop(), clock.stamp())) if state["concept"] else None))
    flux_adapter.FluxConceptProcessor._concept_step = timed_step
    original = session_module.concept_attention
    try:
        with torch.inference_mode(), (PeakCUDA() if clock.cuda else PeakRSS()) as memory:
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
        for handle in handles:
            handle.remove()
    return (clock.seconds(spans["block"]), clock.seconds(spans["concept"]), clock.seconds(spans["gemm"]),
            memory.extra_mib)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 image tokens, 2 repeats on the CPU (< 2 minutes)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 on the CPU, 10 on a GPU")
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one), cpu or cuda[:index]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on the CPU, bf16 on a GPU")
    args = parser.parse_args()
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                               else "cpu" if args.device == "auto" else args.device)
    gpu = args.device.type == "cuda"
    args.dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    if args.quick:
        args.tokens, args.repeats = [1024], args.repeats or (5 if gpu else 2)
    args.repeats = args.repeats or (10 if gpu else 3)
    return args


def describe(args: argparse.Namespace, concepts: int) -> str:
    dtype = {v: k for k, v in DTYPES.items()}[args.dtype]
    where = (f"{torch.cuda.get_device_name(args.device)}, CUDA events" if args.device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    return (f"FLUX.1 dual block, width {WIDTH} ({HEADS}×{HEAD_DIM}), {TEXT_TOKENS} text tokens, "
            f"{concepts} concepts, {dtype}, {where}")


def main() -> None:
    args = parse_arguments()
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    clock = Clock(args.device)
    model = build_model(args.device, args.dtype)
    concepts = [f"concept{i}" for i in range(args.concepts)]
    g = torch.Generator().manual_seed(1)
    embeds = [torch.randn(1, T5_DIM, generator=g) for _ in concepts]
    print(describe(args, len(concepts)))
    print(f"{'image tokens':>12} | {'plain s':>8} | {'concept s':>9} | {'naive s':>8} | "
          f"{'concept/plain':>13} | {'naive/plain':>11} | {'concept step':>12} | {'naive step':>10} | "
          f"{'extra MiB concept':>17} | {'naive':>7} | {'GEMMs':>6}")
    variants = ("plain", "concept", "naive")
    for tokens in args.tokens:
        inputs = model_inputs(tokens, args.device, args.dtype)
        for variant in variants if clock.cuda else ("concept",):  # warm-up (every kernel once on a GPU)
            time_block(model, inputs, variant, concepts, embeds, clock)
        results: dict[str, list[tuple[float, ...]]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for variant in variants:
                results[variant].append(time_block(model, inputs, variant, concepts, embeds, clock))
        med = {v: [statistics.median(column) for column in zip(*rows)] for v, rows in results.items()}
        plain = med["plain"][0]
        mem = {v: med[v][3] - med["plain"][3] for v in variants}
        print(f"{tokens:>12} | {plain:>8.3f} | {med['concept'][0]:>9.3f} | {med['naive'][0]:>8.3f} | "
              f"{med['concept'][0] / plain - 1:>+12.1%} | {med['naive'][0] / plain - 1:>+10.1%} | "
              f"{med['concept'][1] / plain:>11.1%} | {med['naive'][1] / plain:>9.1%} | "
              f"{mem['concept']:>17.0f} | {mem['naive']:>7.0f} | {med['concept'][2] / plain:>5.1%}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
