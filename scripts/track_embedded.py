#!/usr/bin/env python
"""Append one point of the embedded model's training curve: loss and concept-map quality at a checkpoint.

Exports the checkpoint's EMA weights to a temporary pipeline, runs ``benchmarks/scenes.py`` on
``--scenes`` validation scenes (both tasks, empty prompt) and, with ``--generated``,
``benchmarks/generated_shapes.py`` (one-object captions and ``--pairs`` two-object captions); then
appends a JSON line to ``--curve`` with the step, the training wall time, the mean loss of the last
200 steps and the binding head's accuracy, the caption reliance (loss with the empty caption minus
with the true one), the concept queries' selectivity per block and, per task, the ConceptAttention scores of the default blocks
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


def recent_loss(loss_csv: Path, step: int, window: int = 200, column: str = "loss") -> float | None:
    """Mean of ``column`` over the ``window`` steps up to ``step`` (nan rows skipped)."""
    if not loss_csv.is_file():
        return None
    with open(loss_csv) as f:
        values = [float(r[column]) for r in csv.DictReader(f) if step - window < int(r["step"]) <= step]
    values = [v for v in values if v == v]
    return round(sum(values) / len(values), 5) if values else None


def caption_reliance(pipe, levels=(0.9, 0.95, 0.98), count: int = 48) -> dict[str, float]:
    """Flow loss with the empty caption minus with the full caption on ``count`` training scenes.

    Zero means the model ignores the caption at that noise level; the larger, the more it uses it.
    """
    import numpy as np
    import torch

    from train_embedded import BindingHeads, TextStates, training_losses
    from concept_attention.scenes.training import full_caption, render_training_scene

    from concept_attention.embedded import DEFAULT_SIZE

    rng = np.random.default_rng(12345)
    scenes = [render_training_scene(1_000_000_000 + i, DEFAULT_SIZE) for i in range(count)]
    images = torch.from_numpy(np.stack([s.image for s in scenes]))
    captions = [full_caption(s, rng) for s in scenes]
    heads, states = BindingHeads(len(pipe.transformer.transformer_blocks), pipe.transformer.inner_dim), TextStates(pipe.transformer)
    out = {}
    try:
        with torch.no_grad():
            for level in levels:
                losses = [float(training_losses(pipe, heads, states, images, prompts, [()] * count, {},
                                                generator=torch.Generator().manual_seed(0),
                                                sigma=torch.full((count,), level))[0])
                          for prompts in (captions, [""] * count)]
                out[f"t={level}"] = round(losses[1] - losses[0], 5)
    finally:
        states.remove()
    return out


def query_selectivity(pipe, count: int = 20, timestep: float = 0.5) -> dict[str, dict[str, float]]:
    """Do concept queries pick out their own object? Per block, over ``count`` validation scenes.

    For each object: (mean inside − mean outside the object of its own word's query·key logit) minus
    the same for the other words of its kind, averaged over the scene's objects and both kinds.
    ``mean`` over scenes (0 = no selectivity) and ``positive``: the share of scenes above 0.
    """
    import numpy as np

    from concept_attention import explain
    from concept_attention.embedded import DEFAULT_SIZE
    from concept_attention.evaluation.scenes import VALIDATION_SEED
    from concept_attention.scenes.render import BACKGROUNDS, COLOURS, SHAPES, render_scene
    from concept_attention.viz import upsample

    blocks = list(range(len(pipe.transformer.transformer_blocks)))
    per_scene = {b: [] for b in blocks}
    for index in range(count):
        scene = render_scene(VALIDATION_SEED + index, DEFAULT_SIZE)
        contrasts = {b: [] for b in blocks}
        for words, kind in ((list(COLOURS), "colour"), (list(SHAPES), "shape")):
            maps = explain(pipe, scene.image, words + list(BACKGROUNDS), timestep=timestep, num_samples=1,
                           seed=index, layers=blocks, space="cross_attention", softmax=False)
            for block in blocks:
                logits = upsample(maps.for_layers([block]).tensor[0], scene.image.shape[:2]).numpy()
                for obj in scene.objects:
                    contrast = logits[:, obj.mask].mean(axis=1) - logits[:, ~obj.mask].mean(axis=1)
                    own = words.index(getattr(obj, kind))
                    others = [contrast[i] for i in range(len(words)) if i != own]
                    contrasts[block].append(float(contrast[own] - np.mean(others)))
        for block in blocks:
            per_scene[block].append(float(np.mean(contrasts[block])))
    return {f"block {b}": {"mean": round(float(np.mean(v)), 4), "positive": round(float(np.mean(np.array(v) > 0)), 3)}
            for b, v in per_scene.items()}


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

    loss_csv = Path(args.loss_csv or Path(args.ckpt).parent / "loss.csv")
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    step, wall = int(ckpt["step"]), float(ckpt["wall_seconds"])
    del ckpt
    work = Path(tempfile.mkdtemp(prefix="track-embedded-"))
    model_dir = Path(args.keep) if args.keep else work / "model"
    export(args.ckpt, str(model_dir))
    defaults = json.loads((model_dir / "concept_attention.json").read_text())  # written by export

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scenes.py"), "--model", str(model_dir),
                    "--scenes", str(args.scenes), "--timestep", str(args.timestep), "--out", str(work / "scenes"),
                    "--split", "validation", "--prompts", "empty"], check=True, env=env, stdout=subprocess.DEVNULL)
    results = json.loads((work / "scenes" / "scenes.json").read_text())["results"]
    point = {"step": step, "hours": round(wall / 3600, 3),
             "loss": recent_loss(loss_csv, step), "binding_acc": recent_loss(loss_csv, step, column="binding_acc"),
             "scenes": args.scenes, "split": "validation", "timestep": args.timestep}
    from concept_attention import load_pipeline

    pipe = load_pipeline(model_dir)
    point["caption_reliance"] = caption_reliance(pipe)
    point["query_selectivity"] = query_selectivity(pipe)
    del pipe
    for task in ("colour", "shape"):
        point[f"{task}|empty"] = summarise(results, task, "empty")
    if args.generated:
        guidance = float(defaults.get("true_cfg_scale", 1.0))  # the model's default
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
