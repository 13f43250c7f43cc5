"""Does a text-to-image pipeline draw the caption's shape (and colour)? One-object captions, optionally pairs.

For every allowed (shape, colour, background) combination (4 x 4 x 3 minus EXCLUDED_PAIRS = 40
captions "a {colour} {shape} on {background}") and ``--seeds`` seeds, one image is generated at the
model's size (its ``concept_attention.json``), box-downsampled to 64x64, and judged with :func:`concept_attention.scenes.shapes.classify_shape` (object mask by nearest
reference colour, then best template IoU). Reported: right-shape rate (overall, per shape),
shape confusion matrix, fraction with no object found (counted as wrong), the right-colour
rate (nearest object colour of the mask's mean RGB == the caption's colour; no object = wrong) and
the fraction of images with more than one object-coloured region (the largest one is judged), and
the mean template IoU (best shape, and the caption's shape): forced-choice labels of shapeless
blobs are near chance, a low best IoU shows that.

``--pairs N`` adds N two-object captions "a {c1} {s1} and a {c2} {s2} on {background}" (different
colours and shapes), each in both word orders (2N images; seed = the image's index within its
``--batch`` chunk). Each colour is found with
:func:`~concept_attention.scenes.shapes.colour_mask`; reported: both colours drawn, the first
colour left of the second (chance 0.5), each colour region's shape right (chance 0.25), and both
shapes right ("bound": the words were tied to the right objects).

``--guidance`` > 1 turns on classifier-free guidance with the empty prompt (``true_cfg_scale``;
FLUX's ``guidance_scale`` is only used by guidance-distilled transformers and is passed as well).

Usage::

    python benchmarks/generated_shapes.py                       # embedded model, 2 seeds
    python benchmarks/generated_shapes.py --model /path/to/pipeline --seeds 1 --guidance 3 \\
        --out results/generated_shapes.json --sheet results/generated_shapes.png
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from scipy import ndimage

from concept_attention import load_pipeline
from concept_attention.scenes.render import BACKGROUNDS, COLOUR_RGB, COLOURS, EXCLUDED_PAIRS, SHAPES
from concept_attention.scenes.shapes import (MIN_AREA, classify_shape, colour_mask, object_mask, object_pixels,
                                             shape_scores)

JUDGE_SIZE = 64


def combos() -> list[tuple[str, str, str]]:
    """All allowed (shape, colour, background) triples (40)."""
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS if (c, b) not in EXCLUDED_PAIRS]


def pair_captions(count: int, seed: int = 0) -> list[tuple[str, str, str, str, str]]:
    """``count`` (c1, s1, c2, s2, background) tuples, colours and shapes different, a fixed sample."""
    every = [(c1, s1, c2, s2, b) for c1 in COLOURS for c2 in COLOURS for s1 in SHAPES for s2 in SHAPES
             for b in BACKGROUNDS
             if c1 != c2 and s1 != s2 and (c1, b) not in EXCLUDED_PAIRS and (c2, b) not in EXCLUDED_PAIRS]
    if count > len(every):
        raise ValueError(f"there are only {len(every)} different two-object captions, asked for {count}")
    order = np.random.default_rng(seed).permutation(len(every))[:count]
    return [every[i] for i in order]


def both_orders(specs: list[tuple[str, str, str, str, str]]) -> list[tuple[str, str, str, str, str]]:
    """Each (c1, s1, c2, s2, background) followed by the same objects named in the other order."""
    return [order for c1, s1, c2, s2, b in specs for order in ((c1, s1, c2, s2, b), (c2, s2, c1, s1, b))]


def judge_pair(image: np.ndarray, c1: str, s1: str, c2: str, s2: str, background: str) -> dict:
    """Two-object judgement of one image (see the module docstring)."""
    out = {}
    for key, colour, shape in (("first", c1, s1), ("second", c2, s2)):
        mask = colour_mask(image, colour, background)
        present = int(mask.sum()) >= MIN_AREA
        scores = shape_scores(mask) if present else {}
        out[key] = {"present": present, "x": float(np.nonzero(mask)[1].mean()) if present else None,
                    "predicted": max(scores, key=scores.get) if scores else None, "shape": shape}
    both = out["first"]["present"] and out["second"]["present"]
    out["both_colours"] = both
    out["order_right"] = both and out["first"]["x"] < out["second"]["x"]
    out["bound"] = all(out[k]["predicted"] == out[k]["shape"] for k in ("first", "second"))
    return out


def summarise_pairs(judged: list[dict]) -> dict:
    both = [j for j in judged if j["both_colours"]]
    objects = [j[k] for j in judged for k in ("first", "second") if j[k]["present"]]
    return {
        "n_images": len(judged),
        "both_colours": len(both) / max(1, len(judged)),
        "order_right_of_both": sum(j["order_right"] for j in both) / max(1, len(both)),
        "shape_right_of_present": sum(o["predicted"] == o["shape"] for o in objects) / max(1, len(objects)),
        "bound": sum(j["bound"] for j in judged) / max(1, len(judged)),
    }


def nearest_colour(image: np.ndarray, mask: np.ndarray) -> str | None:
    """Object colour nearest to the mean RGB (0..255) of ``image`` under ``mask``."""
    if np.count_nonzero(mask) < MIN_AREA:
        return None
    mean = image[mask].astype(float).mean(axis=0)
    return min(COLOURS, key=lambda c: float(((mean - np.array(COLOUR_RGB[c], float)) ** 2).sum()))


def count_regions(image: np.ndarray, background: str) -> int:
    """Number of object-coloured regions of at least MIN_AREA pixels (1 for a clean one-object image)."""
    labels, n = ndimage.label(object_pixels(image, background))
    return int((np.bincount(labels.ravel())[1:] >= MIN_AREA).sum())


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
    """uint8 (N, 64, 64, 3) images, one per (prompt, seed) pair: made at the model's size, judged at 64 px."""
    from PIL import Image

    from concept_attention.loading import pipeline_defaults

    defaults = pipeline_defaults(pipe)
    size = int(defaults.get("size", JUDGE_SIZE))
    call = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                max_sequence_length=int(defaults.get("max_sequence_length", 32)), output_type="np")
    if guidance > 1 and not getattr(pipe.transformer.config, "guidance_embeds", False):
        call.update(true_cfg_scale=guidance, negative_prompt=[""] * len(prompts))
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    images = pipe(prompt=prompts, generator=generators, **call).images
    images = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)
    if size == JUDGE_SIZE:
        return images
    return np.stack([np.asarray(Image.fromarray(img).resize((JUDGE_SIZE, JUDGE_SIZE), Image.BOX)) for img in images])


def contact_sheet(records: list[dict], images: list[np.ndarray], path: Path, cols: int = 10, scale: int = 2) -> None:
    """PNG grid: each image (scaled up) with its caption and the predicted shape (green = right)."""
    from PIL import Image, ImageDraw

    tile_w, tile_h = JUDGE_SIZE * scale, JUDGE_SIZE * scale + 24
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile_w, rows * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (rec, img) in enumerate(zip(records, images)):
        x, y = (i % cols) * tile_w, (i // cols) * tile_h
        sheet.paste(Image.fromarray(img).resize((JUDGE_SIZE * scale, JUDGE_SIZE * scale), Image.NEAREST), (x, y))
        draw.text((x + 2, y + JUDGE_SIZE * scale), f"{rec['colour']} {rec['shape']} {rec['background']}", fill="black")
        right = rec["predicted"] == rec["shape"]
        draw.text((x + 2, y + JUDGE_SIZE * scale + 11), f"-> {rec['predicted']} / {rec['predicted_colour']}",
                  fill=(0, 140, 0) if right else (200, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def summarise(records: list[dict]) -> dict:
    n = len(records)
    labels = list(SHAPES) + ["none"]
    confusion = {s: {p: 0 for p in labels} for s in SHAPES}
    for r in records:
        confusion[r["shape"]][r["predicted"] or "none"] += 1
    per_shape = {s: sum(r["predicted"] == s for r in records if r["shape"] == s) / max(1, sum(confusion[s].values()))
                 for s in SHAPES}
    return {
        "n_images": n,
        "shape_right": sum(r["predicted"] == r["shape"] for r in records) / n,
        "shape_right_per_shape": per_shape,
        "no_object": sum(r["predicted"] is None for r in records) / n,
        "colour_right": sum(r["predicted_colour"] == r["colour"] for r in records) / n,
        "several_regions": sum(r["regions"] > 1 for r in records) / n,
        # how shape-like the judged region is (1 = a perfect renderer shape; no object = 0)
        "mean_best_iou": float(np.mean([max(r["scores"].values(), default=0.0) for r in records])),
        "mean_caption_shape_iou": float(np.mean([r["scores"].get(r["shape"], 0.0) for r in records])),
        "confusion": confusion,  # rows = caption shape, columns = predicted shape
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline directory (default: the embedded model)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per caption (0..N-1)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8, help="images per pipeline call")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--pairs", type=int, default=0, help="also judge this many two-object captions (1 seed)")
    parser.add_argument("--out", default="results/generated_shapes.json")
    parser.add_argument("--sheet", default=None, help="optional contact-sheet PNG path")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    jobs = [(combo, seed) for combo in combos() for seed in range(args.seeds)]
    records, images = [], []
    start = time.time()
    for i in range(0, len(jobs), args.batch):
        chunk = jobs[i: i + args.batch]
        prompts = [f"a {c} {s} on {b}" for (s, c, b), _ in chunk]
        batch = generate(pipe, prompts, [seed for _, seed in chunk], args.steps, args.guidance)
        for ((shape, colour, background), seed), prompt, img in zip(chunk, prompts, batch):
            mask = object_mask(img, background)
            predicted = classify_shape(img, background)
            scores = shape_scores(mask) if predicted else {}
            records.append({
                "prompt": prompt, "seed": seed, "shape": shape, "colour": colour, "background": background,
                "predicted": predicted, "predicted_colour": nearest_colour(img, mask),
                "scores": {k: round(v, 4) for k, v in scores.items()},
                "mask_area": int(mask.sum()), "regions": count_regions(img, background),
            })
            images.append(img)
    summary = summarise(records)
    pairs = []
    specs = both_orders(pair_captions(args.pairs))
    for i in range(0, len(specs), args.batch):
        chunk = specs[i: i + args.batch]
        prompts = [f"a {c1} {s1} and a {c2} {s2} on {b}" for c1, s1, c2, s2, b in chunk]
        batch = generate(pipe, prompts, list(range(len(chunk))), args.steps, args.guidance)
        pairs += [{"prompt": p, **judge_pair(img, *spec)} for p, spec, img in zip(prompts, chunk, batch)]
    if pairs:
        summary["pairs"] = summarise_pairs(pairs)
        summary["pairs_by_order"] = {name: summarise_pairs(pairs[start::2]) for start, name in
                                     ((0, "as sampled"), (1, "reversed"))}
    summary.update(model=args.model or "embedded", seeds=args.seeds, steps=args.steps, guidance=args.guidance,
                   seconds=round(time.time() - start, 1))

    print(f"{summary['n_images']} images ({summary['seconds']} s), model {summary['model']}, "
          f"guidance {args.guidance}, steps {args.steps}")
    print(f"shape right {summary['shape_right']:.3f}  colour right {summary['colour_right']:.3f}  "
          f"no object {summary['no_object']:.3f}  several object regions {summary['several_regions']:.3f}")
    print(f"template IoU: best {summary['mean_best_iou']:.3f}, caption's shape "
          f"{summary['mean_caption_shape_iou']:.3f} (renderer scenes: ~0.99)")
    print("per shape: " + "  ".join(f"{s} {v:.2f}" for s, v in summary["shape_right_per_shape"].items()))
    print("confusion (rows = caption, cols = predicted):")
    print("          " + " ".join(f"{p:>8}" for p in list(SHAPES) + ["none"]))
    for s, row in summary["confusion"].items():
        print(f"{s:>9} " + " ".join(f"{v:>8d}" for v in row.values()))

    if pairs:
        ps = summary["pairs"]
        print(f"two-object captions ({ps['n_images']}): both colours {ps['both_colours']:.3f}  first colour left "
              f"{ps['order_right_of_both']:.3f} (chance 0.5)  shape right per object "
              f"{ps['shape_right_of_present']:.3f}  both shapes right {ps['bound']:.3f}")
        print("  both shapes right by word order: " + "  ".join(
            f"{name} {value['bound']:.3f}" for name, value in summary["pairs_by_order"].items()))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "images": records, "pairs": pairs}, indent=1))
    print(f"wrote {out}")
    if args.sheet:
        contact_sheet(records, images, Path(args.sheet))
        print(f"wrote {args.sheet}")


if __name__ == "__main__":
    main()
