"""``concept-attention``: generate or explain images (and videos) with concept maps from the command line.

Exit codes: 0 success, 2 usage error (bad arguments or input), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .video import VIDEO_SUFFIXES

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

GENERATE_EXAMPLES = """examples:
  concept-attention generate "a red circle and a blue square on grass" --concepts red,blue,grass
  concept-attention generate "a dog by a tree" --concepts dog,tree,sky,background \\
      --model black-forest-labs/FLUX.1-schnell --steps 4 --size 1024x768 --layers 9-18
  concept-attention generate "a dog running on a beach" --concepts dog,sand,sea,sky \\
      --model THUDM/CogVideoX-2b --frames 25
"""
EXPLAIN_EXAMPLES = """examples:
  concept-attention explain photo.jpg --concepts dog,grass,sky
  concept-attention explain photo.png --concepts cat,sofa --prompt "a cat on a sofa" --timestep 0.5 --samples 4
  concept-attention explain clip.mp4 --concepts dog,grass,sky --model THUDM/CogVideoX-2b --frames 49
"""


def _version() -> str:
    from . import __version__

    return __version__


class UsageError(ValueError):
    """A command-line argument the user has to fix."""


# ---------------------------------------------------------------- argument parsing helpers
def parse_concepts(text: str) -> list[str]:
    concepts = [item.strip() for item in text.split(",")]
    if not any(concepts):
        raise UsageError("--concepts is empty: give a comma-separated list, e.g. --concepts dog,tree,sky")
    return concepts


def parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--size must look like WIDTHxHEIGHT, e.g. 1024x768, not {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_indices(text: str | None, option: str) -> list[int] | None:
    """``"9-18"``, ``"0,2,5"`` or ``"0-2,7"`` → a sorted list of indices."""
    if text is None:
        return None
    indices: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(-?\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise UsageError(f"{option} must be indices like 9-18 or 0,2,5, not {text!r}")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start:
            raise UsageError(f"{option}: range {part} runs backwards")
        indices.update(range(start, end + 1))
    return sorted(indices)


def slug(text: str, limit: int = 40) -> str:
    cleaned = re.sub(r"[^0-9A-Za-z]+", "-", text).strip("-").lower()
    return cleaned[:limit].strip("-") or "run"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concept-attention",
        description="Where does a diffusion transformer see each concept? ConceptAttention maps for "
        "generated and real images and videos. With no --model, the small embedded model is used.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--concepts", required=True, help="comma-separated concepts, e.g. dog,tree,sky")
        sub.add_argument("--model", default=None, help="Hub id or local diffusers directory (default: embedded model)")
        sub.add_argument("--out", default=None, help="output folder (default: out/<name>)")
        sub.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        sub.add_argument("--size", default=None, help="WIDTHxHEIGHT to run at (default: the model's native size)")
        sub.add_argument("--layers", default=None, help="dual-block indices, e.g. 9-18 (default: the deeper half)")
        sub.add_argument("--space", default="output", choices=["output", "cross_attention", "value"],
                         help="map space (default: output = ConceptAttention)")
        sub.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda")
        sub.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
        sub.add_argument("--no-figure", action="store_true", help="skip figure.png (faster)")

    generate = commands.add_parser(
        "generate", help="generate an image (or video) and its concept maps", epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("prompt", help="the text prompt")
    common(generate)
    generate.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    generate.add_argument("--timesteps", default=None, help="steps whose maps are averaged, e.g. 0-3 (default: all)")
    generate.add_argument("--frames", type=int, default=None,
                          help="video models: frames to generate, 4k+1 for CogVideoX (default: the model's)")

    explain = commands.add_parser(
        "explain", help="concept maps for an existing image or video", epilog=EXPLAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("image", metavar="FILE", help="an image (any format PIL reads) or, for a video model "
                         f"such as CogVideoX, a video ({', '.join(VIDEO_SUFFIXES)})")
    common(explain)
    explain.add_argument("--prompt", default="", help="text shown with the image (default: empty)")
    explain.add_argument("--timestep", type=float, default=None,
                         help="noise level in (0, 1] (default: the model's, else 0.5)")
    explain.add_argument("--samples", type=int, default=None,
                         help="noise samples averaged (default 4 for images, 2 for videos)")
    explain.add_argument("--frames", type=int, default=None,
                         help="videos: leading frames to explain, 4k+1 (default: as many as the model takes)")

    commands.add_parser("models", help="list supported model families and the embedded default model")
    app = commands.add_parser("app", help="serve the web app (generate and explain in the browser)")
    app.add_argument("--model", default=None, help="Hub id or local diffusers directory (default: embedded model)")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    app.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    app.add_argument("--share", default="no", choices=["yes", "no"], help="create a public gradio link (default no)")
    app.add_argument("--device", default="auto")
    app.add_argument("--dtype", default="auto")
    commands.add_parser("eval", help="zero-shot segmentation benchmarks (see `concept-attention eval --help`)",
                        add_help=False)
    return parser


# ---------------------------------------------------------------- commands
def _console():
    from rich.console import Console

    return Console(stderr=True)


def _load(args: argparse.Namespace, console: Any) -> Any:
    from .loading import load_pipeline

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


def run_generate(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .generate import generate

    console = _console()
    concepts = parse_concepts(args.concepts)
    size = parse_size(args.size)
    layers = parse_indices(args.layers, "--layers")
    timesteps = parse_indices(args.timesteps, "--timesteps")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    started = time.perf_counter()
    pipe = _load(args, console)
    out = Path(args.out or Path("out") / slug(args.prompt))
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
    from .explain import explain, load_image
    from .loading import pipeline_defaults
    from .video import load_video
    from .video_explain import explain_video

    console = _console()
    concepts = parse_concepts(args.concepts)
    size = parse_size(args.size)
    layers = parse_indices(args.layers, "--layers")
    suffix = Path(args.image).suffix.lower()
    is_video = suffix in VIDEO_SUFFIXES
    if args.frames is not None and not is_video:
        raise UsageError(f"--frames is for videos ({', '.join(VIDEO_SUFFIXES)}), not {args.image}")
    # fail fast on unreadable files, before loading a model
    image = None if is_video else load_image(args.image)
    if is_video:
        load_video(args.image, max_frames=1)
    started = time.perf_counter()
    pipe = _load(args, console)
    if suffix == ".gif" and args.frames is None:  # a GIF is a video for a video model, else an image
        from .adapters import resolve_adapter

        is_video = resolve_adapter(pipe.transformer).video
        image = None if is_video else load_image(args.image)
    spaces = [args.space] + (["cross_attention"] if args.space != "cross_attention" else [])
    timestep = args.timestep if args.timestep is not None else float(pipeline_defaults(pipe).get("timestep", 0.5))
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
    out = Path(args.out or Path("out") / slug(Path(args.image).stem))
    maps.save(out, figure=not args.no_figure)
    _report(maps, out, started, console)
    print(out)
    return EXIT_OK


def run_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .adapters.base import _REGISTRY
    from .loading import EMBEDDED_MODEL_DIR

    table = Table(title="supported model families")
    table.add_column("family")
    table.add_column("transformer classes")
    for cls in _REGISTRY:
        table.add_row(cls.family, ", ".join(cls.transformer_class_names))
    console = Console()
    console.print(table)
    present = (EMBEDDED_MODEL_DIR / "model_index.json").is_file()
    console.print(f"embedded default model: {EMBEDDED_MODEL_DIR} ({'installed' if present else 'missing'}); "
                  "see MODEL_CARD.md there")
    return EXIT_OK


def run_app(args: argparse.Namespace) -> int:
    from .app import launch

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, not {args.port}")
    launch(args.model, host=args.host, port=args.port, share=args.share == "yes", device=args.device,
           dtype=args.dtype, block=True)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":
        from .eval import main as eval_main

        return eval_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .loading import ModelLoadError

    handlers = {"generate": run_generate, "explain": run_explain, "models": run_models, "app": run_app}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except (UsageError, ValueError, TypeError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"concept-attention {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ModelLoadError as error:
        if args.debug:
            raise
        print(f"concept-attention {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as error:  # a runtime failure: one line unless --debug
        if args.debug:
            raise
        print(f"concept-attention {args.command}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
