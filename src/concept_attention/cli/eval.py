"""``concept-attention eval`` / ``python -m concept_attention.eval``: zero-shot segmentation benchmarks.

Data-parallel over processes with Hugging Face accelerate, each process taking a disjoint shard and
rank 0 merging::

    accelerate launch --multi_gpu --num_processes 2 -m concept_attention.eval --dataset voc --data-dir D --out results/

(``--multi_gpu`` selects accelerate's multi-process launcher; on a machine without GPUs the
processes form a CPU/gloo group.)

Per-image records are appended as JSON lines, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .parsing import parse_indices, parse_size
from ..evaluation.runner import (
    DEFAULT_BACKGROUND, EvalSettings, MethodConfig, Runner, ablation_methods, write_summary,
)

DATASETS = ("voc", "voc-multi", "imagenet-seg", "scenes-colour", "scenes-shape")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concept-attention eval",
        description="Zero-shot segmentation with concept maps (paper §5.2): binary protocol on single-class "
        "data, argmax protocol on multi-class data. Resumable; shard with `accelerate launch`.",
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS,
                        help="voc = VOC 2012 val single-class split (binary), voc-multi = full val set (argmax), "
                        "imagenet-seg = gtsegs_ijcv.mat (binary), scenes-* = the embedded model's synthetic scenes")
    parser.add_argument("--data-dir", default=None, help="VOC2012 folder, or the gtsegs_ijcv.mat file/folder")
    parser.add_argument("--model", default=None, help="Hub id or local diffusers directory (default: embedded model)")
    parser.add_argument("--method", default="output", choices=["output", "cross_attention", "value"])
    parser.add_argument("--no-softmax", action="store_true", help="average raw scores (no softmax over concepts)")
    parser.add_argument("--layers", default=None, help="dual-block indices, e.g. 9-18 (default: the deeper half)")
    parser.add_argument("--timestep", type=float, default=0.5, help="noise level t in (0, 1] (default 0.5)")
    parser.add_argument("--samples", type=int, default=1, help="noise samples averaged per image (default 1)")
    parser.add_argument("--prompt", default="", help="prompt shown with every image (default: empty)")
    parser.add_argument("--background", default=None,
                        help="comma-separated background concepts (default: background,grass,sky; "
                        "scenes: grass,sky,wall)")
    parser.add_argument("--ablation", default=None, choices=["table3", "table4", "layers", "timesteps"])
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT to run at (default: the explain size policy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", required=True, help="result folder (per-image JSONL, summary.json, table.md)")
    return parser


def load_samples(dataset: str, data_dir: str | None, limit: int | None, shard: int, shards: int) -> tuple[Any, int, str]:
    """(samples, number of classes, protocol) for a data set name."""
    from ..evaluation.datasets import ImageNetSegmentation, VOCSegmentation

    if dataset in ("voc", "voc-multi"):
        if data_dir is None:
            raise ValueError("--data-dir is required for VOC (the VOC2012 folder)")
        mode = "single_class" if dataset == "voc" else "full"
        samples = VOCSegmentation(data_dir, mode=mode, limit=limit, shard_index=shard, num_shards=shards)
        return samples, 21, "binary" if dataset == "voc" else "multiclass"
    if dataset == "imagenet-seg":
        if data_dir is None:
            raise ValueError("--data-dir is required for ImageNet-Segmentation (gtsegs_ijcv.mat)")
        path = Path(data_dir)
        if path.is_dir():
            path = path / "gtsegs_ijcv.mat"
        samples = ImageNetSegmentation(path, limit=limit, shard_index=shard, num_shards=shards)
        return samples, 2, "binary"
    if dataset.startswith("scenes-"):
        from ..evaluation.scenes import SceneSegmentation

        task = dataset.split("-", 1)[1]
        samples = SceneSegmentation(task=task, limit=limit, shard_index=shard, num_shards=shards)
        return samples, samples.num_classes, "multiclass"
    raise ValueError(f"unknown dataset {dataset!r}")


def main(argv: Sequence[str] | None = None) -> int:
    from ..loading import load_pipeline
    from ..options import adapter_of, default_layers, resolve_layers

    args = build_parser().parse_args(argv)
    try:
        import torch
        from accelerate import PartialState

        # cpu=True lets a torchrun-launched CPU job form a gloo process group (MULTI_CPU).
        state = PartialState(cpu=not torch.cuda.is_available())
        rank, world = state.process_index, state.num_processes
    except Exception:  # accelerate missing or not launched: one process
        state, rank, world = None, 0, 1
    try:
        layers = parse_indices(args.layers, "--layers")
        size = parse_size(args.size)
        samples, num_classes, protocol = load_samples(args.dataset, args.data_dir, args.limit, rank, world)
        if args.background is not None:
            background = tuple(b.strip() for b in args.background.split(",") if b.strip())
        elif hasattr(samples, "default_background"):
            background = tuple(samples.default_background())
        else:
            background = DEFAULT_BACKGROUND
    except (ValueError, FileNotFoundError) as error:
        print(f"concept-attention eval: error: {error}", file=sys.stderr)
        return 2
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    num_layers = len(adapter_of(pipe).dual_blocks)
    base = MethodConfig(
        name={"output": "ConceptAttention (output space)", "cross_attention": "cross-attention",
              "value": "value space"}[args.method] + (" without softmax" if args.no_softmax else ""),
        space=args.method, softmax=not args.no_softmax,
        layers=tuple(resolve_layers(layers, num_layers, default_layers(pipe))), timestep=args.timestep,
    )
    methods = ablation_methods(args.ablation, base, num_layers=num_layers)
    settings = EvalSettings(
        dataset=args.dataset, protocol=protocol, background=background, prompt=args.prompt,
        num_samples=args.samples, seed=args.seed, size=size, model=args.model, limit=args.limit,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps({"argv": list(argv) if argv is not None else sys.argv[1:],
                                                   "world_size": world}, indent=2))
    progress = _progress_printer(rank)
    Runner(pipe, samples, settings, methods, out, rank=rank, num_classes=num_classes, progress=progress).run()
    if state is not None and world > 1:
        state.wait_for_everyone()
    if rank == 0:
        summary = write_summary(out, settings, methods, num_classes)
        print((out / "table.md").read_text())
        print(f"wrote {out}/summary.json and table.md ({len(summary['results'])} method(s))")
    return 0


def _progress_printer(rank: int):
    from rich.console import Console

    console = Console(stderr=True)
    state = {"last": -1}

    def report(done: int, total: int, image_id: str) -> None:
        if rank != 0 or total == 0:
            return
        percent = int(100 * done / total)
        if percent // 10 != state["last"] // 10 or done == total:
            state["last"] = percent
            console.print(f"[rank 0] {done}/{total} images ({percent}%) {image_id}")

    return report


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
