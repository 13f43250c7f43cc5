#!/usr/bin/env python
"""Append one point of the embedded model's training curve: loss and concept-map quality at a checkpoint.

Exports the checkpoint's EMA weights to a temporary pipeline, runs ``benchmarks/scenes.py`` on
``--scenes`` held-out scenes (both tasks, caption and empty prompt) and, with ``--generated``,
``benchmarks/generated_shapes.py`` (one-object captions and ``--pairs`` two-object captions); then
appends a JSON line to ``--curve`` with the step, the training wall time, the mean loss of the last
200 steps, the caption reliance (loss with the empty caption minus with the true one), the concept
queries' selectivity per block and, per task, the ConceptAttention scores of the default blocks
and of the best single block.

  python scripts/track_embedded.py --ckpt checkpoints/embedded/last.pt --scenes 40 --generated
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def recent_loss(loss_csv: Path, step: int, window: int = 200) -> float | None:
    if not loss_csv.is_file():
        return None
    with open(loss_csv) as f:
        values = [float(r["loss"]) for r in csv.DictReader(f) if step - window < int(r["step"]) <= step]
    return sum(values) / len(values) if values else None


def caption_reliance(pipe, levels=(0.9, 0.95, 0.98), count: int = 48) -> dict[str, float]:
    """Flow loss with the empty caption minus with the true caption on ``count`` training-style scenes.

    Zero means the model ignores the caption at that noise level; the larger, the more it uses it.
    """
    import torch

    from train_embedded import flow_loss, make_batch

    images, captions = make_batch(12345, 0, count, caption_mode="full")
    out = {}
    with torch.no_grad():
        for level in levels:
            losses = [float(flow_loss(pipe, images, prompts, generator=torch.Generator().manual_seed(0),
                                      sigma=torch.full((count,), level)))
                      for prompts in (captions, [""] * count)]
            out[f"t={level}"] = round(losses[1] - losses[0], 5)
    return out


def query_selectivity(pipe, count: int = 20, timestep: float = 0.9) -> dict[str, float]:
    """Do concept queries pick out their own object? Per block, over ``count`` held-out scenes.

    For each object: (mean inside − mean outside the object of its own word's query·key logit) minus
    the same for the other words of its kind, averaged over objects. 0 = no selectivity.
    """
    import numpy as np
    import torch

    from concept_attention import explain
    from concept_attention.evaluation.scenes import HELD_OUT_SEED
    from concept_attention.scenes.render import BACKGROUNDS, COLOURS, SHAPES, render_scene
    from concept_attention.viz import upsample

    blocks = list(range(len(pipe.transformer.transformer_blocks)))
    totals = {b: [] for b in blocks}
    for index in range(count):
        scene = render_scene(HELD_OUT_SEED + index)
        for words, kind in ((list(COLOURS), "colour"), (list(SHAPES), "shape")):
            maps = explain(pipe, scene.image, words + list(BACKGROUNDS), timestep=timestep, num_samples=1,
                           seed=index, layers=blocks, space="cross_attention", softmax=False)
            for block in blocks:
                logits = upsample(maps.for_layers([block]).tensor[0], scene.image.shape[:2]).numpy()
                for obj in scene.objects:
                    contrast = logits[:, obj.mask].mean(axis=1) - logits[:, ~obj.mask].mean(axis=1)
                    own = words.index(getattr(obj, kind))
                    others = [contrast[i] for i in range(len(words)) if i != own]
                    totals[block].append(float(contrast[own] - np.mean(others)))
    return {f"block {b}": round(float(np.mean(v)), 4) for b, v in totals.items()}


def summarise(results: dict, task: str, prompt: str) -> dict:
    """Default-block and best-single-block ConceptAttention scores for one task and prompt."""
    default = results[f"{task}|{prompt}|ConceptAttention (default blocks)"]
    blocks = {key.rsplit(" ", 1)[1]: value for key, value in results.items()
              if key.startswith(f"{task}|{prompt}|ConceptAttention block ")}
    best = max(blocks, key=lambda b: blocks[b]["identity"])
    pick = ("identity", "miou", "acc")
    return {"default": {k: round(default[k], 4) for k in pick},
            "best_block": int(best), "best": {k: round(blocks[best][k], 4) for k in pick}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="checkpoints/embedded/last.pt")
    ap.add_argument("--scenes", type=int, default=40)
    ap.add_argument("--curve", default="checkpoints/embedded/curve.jsonl")
    ap.add_argument("--timestep", type=float, default=0.5, help="noise level of the scene benchmark")
    ap.add_argument("--generated", action="store_true", help="also score generated one-object shapes")
    ap.add_argument("--pairs", type=int, default=24, help="with --generated: two-object captions to judge too")
    ap.add_argument("--loss-csv", default=None, help="loss log (default: loss.csv beside the checkpoint)")
    ap.add_argument("--keep", default=None, help="keep the exported pipeline in this directory")
    args = ap.parse_args()

    import torch

    from export_embedded import export

    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    step, wall = int(ckpt["step"]), float(ckpt["wall_seconds"])
    del ckpt
    work = Path(tempfile.mkdtemp(prefix="track-embedded-"))
    model_dir = Path(args.keep) if args.keep else work / "model"
    export(args.ckpt, str(model_dir))
    defaults = ROOT / "src" / "concept_attention" / "models" / "embedded" / "concept_attention.json"
    shutil.copy(defaults, model_dir / "concept_attention.json")

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scenes.py"), "--model", str(model_dir),
                    "--scenes", str(args.scenes), "--timestep", str(args.timestep), "--out", str(work / "scenes")], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    results = json.loads((work / "scenes" / "scenes.json").read_text())["results"]
    point = {"step": step, "hours": round(wall / 3600, 3),
             "loss": recent_loss(Path(args.loss_csv or Path(args.ckpt).parent / "loss.csv"), step), "scenes": args.scenes,
             "timestep": args.timestep}
    from concept_attention import load_pipeline

    pipe = load_pipeline(model_dir)
    point["caption_reliance"] = caption_reliance(pipe)
    point["query_selectivity"] = query_selectivity(pipe)
    del pipe
    for task in ("colour", "shape"):
        for prompt in ("empty", "caption"):
            point[f"{task}|{prompt}"] = summarise(results, task, prompt)
    if args.generated:
        guidance = float(json.loads(defaults.read_text()).get("true_cfg_scale", 1.0))  # the model's default
        out = work / "generated.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generated_shapes.py"), "--model",
                        str(model_dir), "--out", str(out), "--guidance", str(guidance), "--pairs", str(args.pairs)], check=True, env=env, stdout=subprocess.DEVNULL)
        generated = json.loads(out.read_text())["summary"]
        point["generated_right_shape"] = generated["shape_right"]
        point["generated_right_colour"] = generated["colour_right"]
        point["generated_guidance"] = guidance
        if "pairs" in generated:
            point["generated_pairs"] = {k: round(v, 4) for k, v in generated["pairs"].items()}
    with open(args.curve, "a") as f:
        f.write(json.dumps(point) + "\n")
    print(json.dumps(point, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
