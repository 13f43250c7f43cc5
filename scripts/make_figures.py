#!/usr/bin/env python
"""Make the documentation's figures with the embedded model (run again after a new model ships).

  python scripts/make_figures.py                    # all three
  python scripts/make_figures.py --only quickstart  # one of: quickstart, 12, 50

(a) ``docs/images/quickstart-figure.png``: the ``figure.png`` that
    ``concept-attention generate "a red circle and a blue square on grass" --concepts red,blue,circle,square,grass``
    writes (same defaults: seed 0, the model's steps and size, ``maps.save``);
(b) ``docs/images/figure-12-concepts.png``: a scene with 12 concepts;
(c) a 50-concept figure in a temporary folder (not for the docs): its path and pixel size are printed,
    to check that the layout wraps (the figure must stay at most ~2,500 px wide).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ("a red circle and a blue square on grass", ["red", "blue", "circle", "square", "grass"])
TWELVE = ("a red circle and a blue square and a yellow triangle on grass",
          ["red", "blue", "yellow", "green", "circle", "square", "triangle", "cross", "grass", "sky", "wall",
           "background"])
FIFTY_EXTRA = ["dog", "cat", "tree", "house", "car", "person", "bird", "flower", "water", "sand", "road", "cloud",
               "sun", "moon", "star", "boat", "chair", "table", "window", "door", "book", "cup", "ball", "box",
               "hat", "shoe", "fish", "horse", "cow", "apple", "banana", "bread", "lamp", "clock", "phone",
               "bottle", "bicycle", "mountain"]
FIFTY = (TWELVE[0], TWELVE[1] + FIFTY_EXTRA)


def figure_of(pipe: Any, prompt: str, concepts: list[str], folder: Path) -> Path:
    """Generate as ``concept-attention generate`` does and save the result folder; returns figure.png."""
    from concept_attention import generate

    started = time.perf_counter()
    maps = generate(pipe, prompt, concepts)
    maps.save(folder)
    print(f"{len(concepts)} concepts: generated and saved in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return folder / "figure.png"


def pixel_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as picture:
        return picture.size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "images", help="where (a) and (b) go")
    parser.add_argument("--only", choices=["quickstart", "12", "50"], action="append",
                        help="make only this figure (repeatable; default all three)")
    args = parser.parse_args(argv)
    wanted = args.only or ["quickstart", "12", "50"]

    from concept_attention import load_pipeline

    pipe = load_pipeline()
    args.docs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="concept-figures-") as scratch:
        for name, target in (("quickstart", "quickstart-figure.png"), ("12", "figure-12-concepts.png")):
            if name in wanted:
                prompt, concepts = QUICKSTART if name == "quickstart" else TWELVE
                made = figure_of(pipe, prompt, concepts, Path(scratch) / name)
                shutil.copyfile(made, args.docs / target)
                width, height = pixel_size(args.docs / target)
                print(f"{args.docs / target}: {width}x{height} px")
    if "50" in wanted:
        folder = Path(tempfile.mkdtemp(prefix="concept-figure-50-"))
        made = figure_of(pipe, FIFTY[0], FIFTY[1], folder)
        width, height = pixel_size(made)
        print(f"{made}: {width}x{height} px (50 concepts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
