"""``concept-attention eval`` / ``python -m concept_attention.eval``: zero-shot segmentation benchmarks.

Data-parallel over processes with Hugging Face accelerate, each process taking a disjoint shard and
rank 0 merging::

    accelerate launch --multi_gpu --num_processes 2 -m concept_attention.eval --dataset voc --data-dir D --out results/

(``--multi_gpu`` selects accelerate's multi-process launcher; on a machine without GPUs the
processes form a CPU/gloo group.)

Per-image records are appended as JSON lines, so an interrupted run (Ctrl-C: exit code 130) resumes
where it stopped, but only with the same settings: a folder made with another model, data set, method,
layers, timestep, samples, softmax, background, prompt, size, seed or library version is refused
(use a new ``--out``, or ``--overwrite``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from .console import quiet_console, silence_loading
from .parsing import parse_indices, parse_size, writable_folder
from ..evaluation.runner import (
    DEFAULT_BACKGROUND, EvalSettings, MethodConfig, ResumeError, Runner, ablation_methods, prepare_folder,
    read_records, run_fingerprint, write_summary,
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
    parser.add_argument("--out", required=True, help="result folder (per-image JSONL, summary.json, table.md); an "
                        "interrupted run resumes there when every setting matches")
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' warnings and logs")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the results already in --out and start afresh (e.g. after changing a setting)")
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
    """Run (or resume) an evaluation; exit codes: 0 done, 2 usage error, 130 interrupted (resumable)."""
    args = build_parser().parse_args(argv)
    quiet_console("eval", verbose=args.verbose)
    state, rank, world = _processes()
    try:
        layers, size = parse_indices(args.layers, "--layers"), parse_size(args.size)
        samples, num_classes, protocol = load_samples(args.dataset, args.data_dir, args.limit, rank, world)
        writable_folder(args.out)
    except (ValueError, FileNotFoundError) as error:
        return _error(error)
    from ..loading import load_pipeline

    silence_loading(args.verbose)
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    settings = EvalSettings(dataset=args.dataset, protocol=protocol, background=_background(args, samples),
                            prompt=args.prompt, num_samples=args.samples, seed=args.seed, size=size, model=args.model,
                            limit=args.limit)
    methods = _methods(pipe, args, layers)
    out = Path(args.out)
    try:
        if rank == 0:
            prepare_folder(out, run_fingerprint(settings, methods), overwrite=args.overwrite)
        _wait(state, world)
        Runner(pipe, samples, settings, methods, out, rank=rank, num_classes=num_classes,
               progress=_progress_printer(rank)).run()
    except ResumeError as error:
        return _error(error)
    except KeyboardInterrupt:
        done = len(read_records(out))
        print(f"concept-attention eval: interrupted after {done} record(s); they are kept in {out}: run the same "
              "command again to resume", file=sys.stderr)
        return 130
    _wait(state, world)
    if rank == 0:
        summary = write_summary(out, settings, methods, num_classes)
        print((out / "table.md").read_text())
        print(f"wrote {out}/summary.json and table.md ({len(summary['results'])} method(s))")
    return 0


def _processes() -> tuple[Any, int, int]:
    """(accelerate state or None, rank, world size)."""
    try:
        import torch
        from accelerate import PartialState

        # cpu=True lets a torchrun-launched CPU job form a gloo process group (MULTI_CPU).
        state = PartialState(cpu=not torch.cuda.is_available())
        return state, state.process_index, state.num_processes
    except Exception:  # accelerate missing or not launched: one process
        return None, 0, 1


def _wait(state: Any, world: int) -> None:
    if state is not None and world > 1:
        state.wait_for_everyone()


def _error(error: Exception) -> int:
    print(f"concept-attention eval: error: {error}", file=sys.stderr)
    return 2


def _background(args: argparse.Namespace, samples: Any) -> tuple[str, ...]:
    if args.background is not None:
        return tuple(b.strip() for b in args.background.split(",") if b.strip())
    if hasattr(samples, "default_background"):
        return tuple(samples.default_background())
    return DEFAULT_BACKGROUND


def _methods(pipe: Any, args: argparse.Namespace, layers: list[int] | None) -> list[MethodConfig]:
    from ..options import adapter_of, default_layers, resolve_layers

    num_layers = len(adapter_of(pipe).dual_blocks)
    base = MethodConfig(
        name={"output": "ConceptAttention (output space)", "cross_attention": "cross-attention",
              "value": "value space"}[args.method] + (" without softmax" if args.no_softmax else ""),
        space=args.method, softmax=not args.no_softmax,
        layers=tuple(resolve_layers(layers, num_layers, default_layers(pipe))), timestep=args.timestep)
    return ablation_methods(args.ablation, base, num_layers=num_layers)


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
