"""Peak extra memory of CogVideoX ConceptAttention: grows with concepts × tokens, not with steps.

A random-weight ``CogVideoXTransformer3DModel`` (RoPE, batched CFG ``[uncond, cond]``) denoises a
latent video for 2, 4 and 8 steps, with and without a ConceptAttention session. Memory is the peak
of live tensor storages created during the run (a ``TorchDispatchMode`` counter, deterministic on
CPU, see ``tests/tiny_video_flux2.py``); "extra" = with maps − without. The last column is what
keeping the per-step image/concept output vectors of every mapped layer would need instead.

Usage: ``python benchmarks/video_memory.py [--width 256] [--frames 13] [--latent 16x24]``
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

import tiny_video_flux2 as tv  # noqa: E402
from concept_attention import ConceptAttention  # noqa: E402


def build(width: int, layers: int):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    heads = max(1, width // 64)
    return CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4, out_channels=4,
        time_embed_dim=64, text_embed_dim=64, num_layers=layers, sample_width=8, sample_height=8,
        patch_size=2, max_text_seq_length=32, use_rotary_positional_embeddings=True,
    ).eval()


def run(transformer, inputs, steps: int, concepts: int | None) -> int:
    gc.collect()
    embeds = [torch.randn(1, transformer.config.text_embed_dim) for _ in range(concepts or 0)]
    with torch.no_grad(), tv.LiveTensorBytes() as meter:
        session = None
        if concepts:
            session = ConceptAttention(transformer, [f"c{i}" for i in range(concepts)], concept_embeds=embeds)
            session.adapter.batched_cfg = True
            session.__enter__()
        try:
            latents = inputs["hidden_states"]
            for step in range(steps):
                timestep = torch.full((2,), 999 - step * (999 // steps), dtype=torch.long)
                model_input = torch.cat([latents, latents])
                noise = transformer(hidden_states=model_input, encoder_hidden_states=inputs["text"],
                                    timestep=timestep, image_rotary_emb=inputs["rotary"]).sample
                latents = latents - 0.1 * noise.chunk(2)[1]
        finally:
            if session is not None:
                session.__exit__(None, None, None)
        if session is not None:
            maps = session.maps  # noqa: F841  (kept, as a user would)
    return meter.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--frames", type=int, default=13, help="latent frames")
    parser.add_argument("--latent", default="16x24", help="latent HxW")
    args = parser.parse_args()
    height, width = (int(v) for v in args.latent.split("x"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    transformer = build(args.width, args.layers)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, args.frames, 4, height, width, generator=g),
        "text": torch.randn(2, 32, transformer.config.text_embed_dim, generator=g),
        "rotary": tv.cogvideox_rotary(transformer, args.frames, height, width),
    }
    tokens = args.frames * (height // 2) * (width // 2)
    mapped_layers = len(range(args.layers // 2, args.layers))
    print(f"CogVideoX random weights: width {args.width}, {args.layers} layers ({mapped_layers} mapped), "
          f"{tokens} video tokens, batched CFG")
    header = ("concepts", "steps", "peak plain", "peak maps", "extra", "vectors", "time")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (8, 5, 12, 12, 10, 12, 6))))
    for concepts in (3, 10):
        for steps in (2, 4, 8):
            start = time.perf_counter()
            plain = run(transformer, inputs, steps, None)
            with_maps = run(transformer, inputs, steps, concepts)
            vectors = steps * mapped_layers * (tokens + concepts) * args.width * 4
            print(f"{concepts:>8} {steps:>5} {plain / 2**20:>10.2f}Mi {with_maps / 2**20:>10.2f}Mi "
                  f"{(with_maps - plain) / 2**10:>8.1f}Ki {vectors / 2**20:>10.2f}Mi "
                  f"{time.perf_counter() - start:>5.1f}s")


if __name__ == "__main__":
    main()
