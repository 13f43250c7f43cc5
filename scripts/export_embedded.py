#!/usr/bin/env python
"""Export the EMA weights of a training checkpoint as the packaged embedded FluxPipeline.

  python scripts/export_embedded.py --ckpt checkpoints/embedded/last.pt \
      --out src/concept_attention/models/embedded

Writes ``FluxPipeline.save_pretrained`` layout (safetensors). ``--fp16`` stores fp16 weights
(``concept_attention.load_pipeline`` loads them back as fp32); by default fp32 (~17 MB).
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


def export(ckpt: str, out: str, fp16: bool = False, vae_dir: str | None = None) -> Path:
    from train_embedded import load_ema_pipeline

    pipe = load_ema_pipeline(ckpt, vae_dir)
    step = pipe.ckpt_step
    if fp16:
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            getattr(pipe, name).to(torch.float16)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
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
    args = ap.parse_args()
    export(args.ckpt, args.out, args.fp16, args.vae)


if __name__ == "__main__":
    main()
