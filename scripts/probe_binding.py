#!/usr/bin/env python
"""Diagnostic: does the embedded model's attention tie a caption's words to their objects?

On held-out two-object scenes (different colours), captioned, noised at each ``--levels`` t, one
forward pass per level; per dual-stream block, from the head-averaged joint attention
probabilities:

* ``image->text mass``: attention image tokens give to all text tokens (uniform: text tokens / all tokens);
* ``i2t``: inside object A, attention to A's colour word minus to B's colour word (and the reverse
  inside B), averaged; 0 = no binding;
* ``t2i``: A's colour word's attention per image token inside A minus inside B (and the reverse),
  times 256 (the number of image tokens); 0 = the word does not pick out its object.

The probabilities are recomputed from the block's own q/k (after qk-norm and RoPE); the processor's
output is checked against diffusers' processor on the same inputs, so the recomputation is exact.

  python scripts/probe_binding.py --ckpt checkpoints/embedded/last.pt
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
import torch.nn.functional as F


class RecordingFluxProcessor:
    """Joint attention with explicit probabilities (stored in ``self.probs``), same output as FluxAttnProcessor."""

    def __init__(self):
        self.probs = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections, apply_rotary_emb

        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        heads = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
        q, k, v = attn.norm_q(heads(q)), attn.norm_k(heads(k)), heads(v)
        eq, ek, ev = attn.norm_added_q(heads(eq)), attn.norm_added_k(heads(ek)), heads(ev)
        query = apply_rotary_emb(torch.cat([eq, q], 1), image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(torch.cat([ek, k], 1), image_rotary_emb, sequence_dim=1)
        self.probs = (torch.einsum("bqhd,bkhd->bhqk", query, key) / attn.head_dim ** 0.5).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", self.probs, torch.cat([ev, v], 1)).flatten(2)
        n = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, n:])), attn.to_add_out(out[:, :n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="checkpoints/embedded/last.pt")
    ap.add_argument("--scenes", type=int, default=24)
    ap.add_argument("--levels", default="0.5,0.9,0.98")
    args = ap.parse_args()

    from train_embedded import DEFAULT_SIZE, MAX_SEQUENCE_LENGTH, latents_and_ids, load_ema_pipeline

    from concept_attention.evaluation.scenes import HELD_OUT_SEED
    from concept_attention.scenes.render import render_scene

    torch.set_grad_enabled(False)
    pipe = load_ema_pipeline(args.ckpt)
    scenes, seed = [], HELD_OUT_SEED
    while len(scenes) < args.scenes:
        scene = render_scene(seed, DEFAULT_SIZE)
        seed += 1
        if len(scene.objects) == 2 and scene.objects[0].colour != scene.objects[1].colour:
            scenes.append(scene)
    captions = [s.caption for s in scenes]
    x0, img_ids = latents_and_ids(pipe, torch.from_numpy(np.stack([s.image for s in scenes])))
    embeds, pooled, txt_ids = pipe.encode_prompt(prompt=captions, prompt_2=captions, device="cpu",
                                                 num_images_per_prompt=1, max_sequence_length=MAX_SEQUENCE_LENGTH)
    n_text = embeds.shape[1]
    grid = int(round((x0.shape[1]) ** 0.5))
    tok = pipe.tokenizer_2

    def word_index(caption: str, word: str) -> int:
        ids = tok(caption, max_length=MAX_SEQUENCE_LENGTH, padding="max_length", truncation=True).input_ids
        return ids.index(tok(word, add_special_tokens=False).input_ids[0])

    def token_mask(mask: np.ndarray) -> torch.Tensor:
        area = F.interpolate(torch.from_numpy(mask[None, None].astype(np.float32)), size=(grid, grid), mode="area")
        return (area[0, 0] > 0.5).flatten()

    masks = [[token_mask(o.mask) for o in s.objects] for s in scenes]
    words = [[word_index(s.caption, o.colour) for o in s.objects] for s in scenes]
    blocks = pipe.transformer.transformer_blocks
    originals = [b.attn.processor for b in blocks]
    recorders = [RecordingFluxProcessor() for _ in blocks]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

    def forward(t: float):
        return pipe.transformer(hidden_states=(1 - t) * x0 + t * noise, timestep=torch.full((len(scenes),), t),
                                guidance=None, pooled_projections=pooled, encoder_hidden_states=embeds,
                                txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    for level in (float(v) for v in args.levels.split(",")):
        reference = forward(level)
        for block, recorder in zip(blocks, recorders):
            block.attn.set_processor(recorder)
        try:
            recorded = forward(level)
        finally:
            for block, original in zip(blocks, originals):
                block.attn.set_processor(original)
        assert torch.allclose(recorded, reference, atol=1e-4), "recomputed attention differs from diffusers'"
        for index, recorder in enumerate(recorders):
            p = recorder.probs.mean(1)  # (batch, query, key), heads averaged
            mass, i2t, t2i = [], [], []
            for b in range(len(scenes)):
                (ma, mb), (wa, wb) = masks[b], words[b]
                image_rows = p[b, n_text:]
                mass.append(float(image_rows[:, :n_text].sum(-1).mean()))
                i2t.append(float((image_rows[ma, wa] - image_rows[ma, wb]).mean()
                                 + (image_rows[mb, wb] - image_rows[mb, wa]).mean()) / 2)
                ta, tb = p[b, wa, n_text:], p[b, wb, n_text:]
                t2i.append(float((ta[ma].mean() - ta[mb].mean()) + (tb[mb].mean() - tb[ma].mean())) / 2 * x0.shape[1])
            print(f"t={level} block {index}: image->text mass {np.mean(mass):.3f}  i2t {np.mean(i2t):+.4f} "
                  f"(>0 in {np.mean(np.array(i2t) > 0):.2f})  t2i {np.mean(t2i):+.3f} "
                  f"(>0 in {np.mean(np.array(t2i) > 0):.2f})", flush=True)


if __name__ == "__main__":
    main()
