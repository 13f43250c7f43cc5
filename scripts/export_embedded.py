#!/usr/bin/env python
"""Export the EMA weights of a training checkpoint as the packaged embedded FluxPipeline.

  python scripts/export_embedded.py --ckpt checkpoints/embedded/last.pt \
      --out src/concept_attention/models/embedded

Writes ``FluxPipeline.save_pretrained`` layout (safetensors) and the library defaults
``concept_attention.json`` (the build's size and T5 length, 20 steps, classifier-free guidance 3,
the web app's example prompts; ``--layers`` = the default blocks, all dual blocks unless given).
A ``MODEL_CARD.md`` already in the folder is kept. ``--fp16`` stores fp16 weights
(``concept_attention.load_pipeline`` loads them back as fp32); by default fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch


EXAMPLES = [
    {"prompt": "a red circle and a blue square on grass", "concepts": ["red", "blue", "circle", "square", "grass"]},
    {"prompt": "a yellow triangle on sky", "concepts": ["yellow", "triangle", "sky"]},
    {"prompt": "a green cross and a red circle and a yellow square on wall",
     "concepts": ["green", "red", "yellow", "cross", "circle", "square", "wall"]},
    {"prompt": "a blue circle on wall", "concepts": ["red", "green", "blue", "yellow", "wall"]},
]


def library_defaults(num_layers: int, layers: list[int] | None = None, recipe: dict | None = None) -> dict:
    """``concept_attention.json`` of the embedded model; with a ``recipe`` that grounded caption words' attention,
    the ``notice`` every display of its maps shows and the blocks it names."""
    from concept_attention.embedded import DEFAULT_SIZE, MAX_SEQUENCE_LENGTH

    defaults = {"size": DEFAULT_SIZE, "max_sequence_length": MAX_SEQUENCE_LENGTH, "num_inference_steps": 20,
                "true_cfg_scale": 3.0, "negative_prompt": "", "layers": layers or list(range(num_layers)),
                "examples": EXAMPLES}
    if recipe and float(recipe.get("grounding_weight") or 0) > 0:
        from train_embedded import grounding_blocks

        blocks = grounding_blocks(recipe)
        names = " and ".join(str(b) for b in blocks)
        defaults["grounded_blocks"] = blocks
        defaults["notice"] = (f"trained maps: in blocks {names} of this small model, caption words' attention to "
                              "their own objects was a training target, so maps from those blocks are partly "
                              "trained, not found (see its MODEL_CARD.md)")
    return defaults


def export(ckpt: str, out: str, fp16: bool = False, vae_dir: str | None = None,
           layers: list[int] | None = None) -> Path:
    from train_embedded import load_ema_pipeline

    pipe = load_ema_pipeline(ckpt, vae_dir)
    step, recipe = pipe.ckpt_step, pipe.ckpt_args
    if fp16:
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            getattr(pipe, name).to(torch.float16)
    out = Path(out)
    card = (out / "MODEL_CARD.md").read_text() if (out / "MODEL_CARD.md").is_file() else None
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    defaults = library_defaults(len(pipe.transformer.transformer_blocks), layers, recipe)
    (out / "concept_attention.json").write_text(json.dumps(defaults, indent=2))
    if card is not None:
        (out / "MODEL_CARD.md").write_text(card)
    info = {"source_checkpoint": str(ckpt), "training_step": step, "dtype": "float16" if fp16 else "float32"}
    (out / "embedded_info.json").write_text(json.dumps(info, indent=2))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported step {step} to {out} ({size / 1e6:.1f} MB)")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="checkpoints/embedded/last.pt")
    ap.add_argument("--out", default="src/concept_attention/models/embedded")
    ap.add_argument("--vae", default=None, help="VAE dir (default: the one recorded in the checkpoint)")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--layers", default=None, help="default blocks, e.g. 0,2,3 (default: every dual block)")
    args = ap.parse_args()
    layers = [int(v) for v in args.layers.split(",")] if args.layers else None
    export(args.ckpt, args.out, args.fp16, args.vae, layers)


if __name__ == "__main__":
    main()
