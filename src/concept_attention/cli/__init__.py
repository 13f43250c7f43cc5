"""``concept-attention``: generate or explain images (and videos) with concept maps from the command line.

Exit codes: 0 success, 2 usage error (bad arguments or input), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .._version import __version__
from ..media import VIDEO_SUFFIXES
from .console import quiet_console
from .parsing import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, UsageError

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



def common(sub: argparse.ArgumentParser) -> None:
    """The options generate and explain share."""
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concept-attention",
        description="Where does a diffusion transformer see each concept? ConceptAttention maps for "
        "generated and real images and videos. With no --model, the small embedded model is used.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--verbose", action="store_true", help="also show the warnings and logs of the libraries underneath")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    quiet_console(args.command, verbose=args.verbose)
    from ..loading import ModelLoadError
    from . import commands

    handlers = {"generate": commands.run_generate, "explain": commands.run_explain, "models": commands.run_models,
                "app": commands.run_app}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print(f"concept-attention {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
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
