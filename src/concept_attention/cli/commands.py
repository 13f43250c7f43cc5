"""The command line's subcommands: generate, explain, models, app (``eval`` is in :mod:`.eval`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..media import VIDEO_SUFFIXES
from .console import silence_loading
from .parsing import EXIT_OK, UsageError, parse_concepts, parse_indices, parse_size, slug, writable_folder


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _load(args: argparse.Namespace, console: Any) -> Any:
    from ..loading import load_pipeline

    silence_loading(getattr(args, "verbose", False))
    with console.status(f"loading {args.model or 'the embedded model'} ..."):
        return load_pipeline(args.model, device=args.device, dtype=args.dtype)


def _report(maps: Any, out: Path, started: float, console: Any) -> None:
    from rich.table import Table

    labels = maps.upsample(maps.image.size[::-1]).argmax(dim=1)[0] if maps.image is not None else maps.segment()[0]
    table = Table(title=f"{len(maps.concepts)} concepts, {maps.space} space, layers {maps.layers}")
    table.add_column("concept")
    table.add_column("area won", justify="right")
    table.add_column("peak", justify="right")
    for i, name in enumerate(maps.concepts):
        share = float((labels == i).float().mean())
        table.add_row(name, f"{share:.0%}", f"{float(maps.tensor[0, i].max()):.3f}")
    console.print(table)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    console.print(f"wrote {out}/ ({files}) in {time.perf_counter() - started:.1f} s")
    if maps.meta.get("model_notice"):
        console.print(f"note on this model: {maps.meta['model_notice']}", style="yellow")


def _shared_options(args: argparse.Namespace) -> tuple[Any, list[str], tuple[int, int] | None, list[int] | None]:
    """(console, concepts, size, layers) as generate and explain read them."""
    return _console(), parse_concepts(args.concepts), parse_size(args.size), parse_indices(args.layers, "--layers")


def run_generate(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..generation import generate

    console, concepts, size, layers = _shared_options(args)
    timesteps = parse_indices(args.timesteps, "--timesteps")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    if timesteps is not None and args.steps is not None and max(timesteps) >= args.steps:
        raise UsageError(f"--timesteps {args.timesteps} selects steps beyond the {args.steps} denoising steps "
                         f"(0-{args.steps - 1})")
    out = writable_folder(args.out or Path("out") / slug(args.prompt))
    started = time.perf_counter()
    pipe = _load(args, console)
    with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("denoising", total=args.steps or None)

        def on_step(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        maps = generate(pipe, args.prompt, concepts, steps=args.steps, seed=args.seed, size=size, layers=layers,
                        timesteps=timesteps, space=args.space, on_step=on_step, num_frames=args.frames)
    maps.save(out, figure=not args.no_figure)
    _report(maps, out, started, console)
    print(out)
    return EXIT_OK


def run_explain(args: argparse.Namespace) -> int:
    from ..explanation import explain, load_image
    from ..core.defaults import default_timestep
    from ..video import load_video
    from ..video_explanation import explain_video

    console, concepts, size, layers = _shared_options(args)
    suffix = Path(args.image).suffix.lower()
    is_video = suffix in VIDEO_SUFFIXES
    if args.frames is not None and not is_video:
        raise UsageError(f"--frames is for videos ({', '.join(VIDEO_SUFFIXES)}), not {args.image}")
    # fail fast on unreadable files, before loading a model
    image = None if is_video else load_image(args.image)
    if is_video:
        load_video(args.image, max_frames=1)
    out = writable_folder(args.out or Path("out") / slug(Path(args.image).stem))
    started = time.perf_counter()
    pipe = _load(args, console)
    if suffix == ".gif" and args.frames is None:  # a GIF is a video for a video model, else an image
        from ..options import adapter_of

        is_video = adapter_of(pipe).video
        image = None if is_video else load_image(args.image)
    spaces = [args.space] + (["cross_attention"] if args.space != "cross_attention" else [])
    timestep = args.timestep if args.timestep is not None else default_timestep(pipe)
    options: dict[str, Any] = dict(prompt=args.prompt, timestep=timestep, seed=args.seed, layers=layers, size=size,
                                   space=spaces)
    if args.samples is not None:
        options["num_samples"] = args.samples
    with console.status(f"explaining the {'video' if is_video else 'image'} at t={timestep} ..."):
        if is_video:
            maps = explain_video(pipe, args.image, concepts, num_frames=args.frames, **options)
        else:
            maps = explain(pipe, image, concepts, **options)
    maps.meta["model_id"] = getattr(pipe, "model_id", None)
    maps.meta["source"] = str(args.image)
    maps.save(out, figure=not args.no_figure)
    _report(maps, out, started, console)
    print(out)
    return EXIT_OK


def run_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..adapters import registered_adapters
    from ..loading import EMBEDDED_MODEL_DIR

    table = Table(title="supported model families")
    table.add_column("family", no_wrap=True)
    table.add_column("makes", no_wrap=True)
    table.add_column("transformer classes", overflow="fold")
    for cls in sorted(registered_adapters(), key=lambda adapter: adapter.family):
        table.add_row(cls.family, "videos" if cls.video else "images", ", ".join(cls.transformer_class_names))
    Console().print(table)
    present = (EMBEDDED_MODEL_DIR / "model_index.json").is_file()
    print(f"embedded default model ({'installed' if present else 'missing'}), model card MODEL_CARD.md in:")
    print(f"  {EMBEDDED_MODEL_DIR}")  # a plain line: a terminal never breaks a path inside a word for us
    return EXIT_OK


def run_app(args: argparse.Namespace) -> int:
    from ..app import launch

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, not {args.port}")
    launch(args.model, host=args.host, port=args.port, share=args.share == "yes", device=args.device,
           dtype=args.dtype, block=True)
    return EXIT_OK


