"""What early exit saves when explaining a real image (CPU, fp32).

1. FLUX.1-shaped tiny model: 19 dual + 38 single blocks (FLUX.1's depth) at a small width. Times
   ``explain()`` with the default layers (dual blocks 9–18, so the forward stops after dual block 18
   and no single block runs) against one full transformer forward on the same noised input.
2. Real width (3072 = 24 × 128, 512 text + N image tokens): times one dual and one single block and
   reports what 19 dual blocks cost against 19 dual + 38 single blocks, i.e. the share of a full
   FLUX.1 forward that an explain pass at the default layers computes (blocks only; embedders and
   the output layer are negligible at this width).

Usage: ``python benchmarks/explain_speed.py [--quick] [--tokens 1024]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image


def tiny_flux_shaped_pipeline():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny  # the tests' offline tokenizers and tiny components

    pipe = tiny.flux_pipeline(seed=0, layers=19)
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=19, num_single_layers=38, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    pipe.default_sample_size = 32  # 64 px images, 16×16 = 256 image tokens
    pipe.concept_attention_defaults = {"max_sequence_length": 16}
    return pipe


def time_it(function, repeats: int) -> float:
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def tiny_model_ratio(repeats: int) -> tuple[float, float]:
    from concept_attention import explain
    from concept_attention.adapters import resolve_adapter

    pipe = tiny_flux_shaped_pipeline()
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    concepts = ["dog", "tree", "sky", "grass"]
    adapter = resolve_adapter(pipe.transformer)
    pixels = pipe.image_processor.preprocess(image, height=64, width=64)
    inputs = adapter.explain_inputs(pipe, pixels, "", 0.5, None, 1, torch.Generator().manual_seed(0), 16)

    def full() -> None:
        with torch.no_grad():
            pipe.transformer(**inputs)

    def early() -> None:
        explain(pipe, image, concepts, num_samples=1)

    return time_it(full, repeats), time_it(early, repeats)


def real_width_blocks(tokens: int, repeats: int) -> tuple[float, float]:
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from diffusers.models.embeddings import FluxPosEmbed

    torch.manual_seed(0)
    dual = FluxTransformerBlock(3072, 24, 128).eval()
    single = FluxSingleTransformerBlock(3072, 24, 128).eval()
    side = int(tokens**0.5)
    image = torch.randn(1, side * side, 3072)
    text = torch.randn(1, 512, 3072)
    temb = torch.randn(1, 3072)
    ids = torch.zeros(512 + side * side, 3)
    ids[512:, 1] = torch.arange(side).repeat_interleave(side).float()
    ids[512:, 2] = torch.arange(side).repeat(side).float()
    rotary = FluxPosEmbed(10000, [16, 56, 56])(ids)
    with torch.inference_mode():
        d = time_it(lambda: dual(image, text, temb, rotary), repeats)
        s = time_it(lambda: single(image, text, temb, rotary), repeats)
    return d, s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    torch.set_grad_enabled(False)
    full, early = tiny_model_ratio(max(3, repeats))
    print(f"FLUX.1-shaped tiny model (19 dual + 38 single blocks, 256 image tokens, 4 concepts):")
    print(f"  full transformer forward {full * 1000:.1f} ms | explain (layers 9-18, early exit, incl. VAE encode "
          f"and concept encoding) {early * 1000:.1f} ms | ratio {early / full:.2f}")
    d, s = real_width_blocks(args.tokens, repeats)
    dual_only, everything = 19 * d, 19 * d + 38 * s
    print(f"Real width 3072, {args.tokens} image + 512 text tokens: dual block {d:.2f} s, single block {s:.2f} s")
    print(f"  19 dual blocks {dual_only:.1f} s vs full FLUX.1 block stack {everything:.1f} s: "
          f"early exit computes {dual_only / everything:.0%} of it ({everything / dual_only:.1f}x faster)")


if __name__ == "__main__":
    main()
