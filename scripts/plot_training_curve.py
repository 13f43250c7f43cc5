#!/usr/bin/env python
"""Plot the embedded model's training curve: loss and concept-map quality against steps and hours.

Reads ``checkpoints/embedded/loss.csv`` (one row per step: flow loss, binding-head accuracy) and
``checkpoints/embedded/curve.jsonl`` (points written by ``scripts/track_embedded.py`` on validation
scenes), writes a PNG and prints a Markdown table of the tracked points. Recipe changes recorded in the checkpoint (``history``) are drawn as vertical lines.

  python scripts/plot_training_curve.py --out docs/images/embedded-training-curve.png
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smooth(values: list[float], window: int = 50) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def read_points(curve: Path) -> list[dict]:
    points = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()]
    points = [p for p in points if p.get("timestep", 0.5) == 0.5]  # the curve is at t = 0.5
    by_step = {p["step"]: p for p in points}  # the latest measurement of a step wins
    return [by_step[s] for s in sorted(by_step)]


def read_rows(loss_csv: Path) -> list[dict]:
    """Rows of loss.csv, one per step: steps logged after the last save of a stopped run are trained again on
    resume, and the later (kept) row of such a step wins."""
    with open(loss_csv) as f:
        by_step = {int(r["step"]): r for r in csv.DictReader(f)}
    return [by_step[s] for s in sorted(by_step)]


def three_places(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown_table(points: list[dict]) -> str:
    """One row per tracked point (validation scenes, empty prompt, t = 0.5)."""
    lines = ["| step | hours | loss | binding head accuracy | colour identity (default / best block) | colour mIoU "
             "(default) | shape identity (default / best block) | shape mIoU (default) | concept queries selective "
             "(share of scenes, best block) | generated right shape / colour | two objects: both colours / both "
             "shapes right |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        c, s = p["colour|empty"], p["shape|empty"]
        gen = p.get("generated_right_shape")
        gen_text = "" if gen is None else f"{gen:.2f} / {p['generated_right_colour']:.2f}"
        pairs = p.get("generated_pairs")
        pairs_text = "" if pairs is None else f"{pairs['both_colours']:.2f} / {pairs['bound']:.2f}"
        selective = p.get("query_selectivity") or {}
        best = max(selective.items(), key=lambda item: item[1]["positive"], default=None)
        selective_text = "" if best is None else f"{best[1]['positive']:.2f} ({best[0]})"
        lines.append(
            f"| {p['step']} | {p['hours']:.2f} | {three_places(p.get('loss'))} | {three_places(p.get('binding_acc'))} | "
            f"{c['default']['identity']:.2f} / {c['best']['identity']:.2f} (block {c['best_block']}) | "
            f"{c['default']['miou']:.2f} | {s['default']['identity']:.2f} / {s['best']['identity']:.2f} "
            f"(block {s['best_block']}) | {s['default']['miou']:.2f} | {selective_text} | {gen_text} | {pairs_text} |")
    return "\n".join(lines)


def decay_began(history: list[dict], index: int) -> bool:
    """Whether the decay start set by ``history[index]`` was reached still in effect: not moved by a later
    start, nor cancelled by ``decay_steps=0``, before that step."""
    start = float(history[index]["change"].partition("=")[2])
    before = [c["change"].partition("=") for c in history if int(c["step"]) < start]
    starts = [i for i, c in enumerate(history) if int(c["step"]) < start and c["change"].startswith("decay_start=")]
    lengths = [float(value) for name, _, value in before if name == "decay_steps"]
    return start > 0 and bool(starts) and starts[-1] == index and bool(lengths) and lengths[-1] > 0


def change_steps(history: list[dict]) -> list[int]:
    """Steps where recorded recipe changes take effect (a decay from its start, not from when it was set)."""
    steps = set()
    for index, change in enumerate(history):
        name, _, value = change["change"].partition("=")
        if name == "decay_start" and decay_began(history, index):
            steps.add(int(float(value)))
        elif name not in ("decay_start", "decay_steps"):
            steps.add(int(change["step"]))
    return sorted(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt-dir", default="checkpoints/embedded")
    ap.add_argument("--out", default="docs/images/embedded-training-curve.png")
    args = ap.parse_args()
    ckpt_dir = Path(args.ckpt_dir)
    rows = read_rows(ckpt_dir / "loss.csv")
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    points = read_points(ckpt_dir / "curve.jsonl")
    history = json.loads((ckpt_dir / "args.json").read_text()).get("history", [])

    fig, (ax_loss, ax_quality) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax_loss.plot(steps, smooth(losses), lw=1.2, color="black", label="flow-matching loss")
    ax_loss.set(xlabel="step", ylabel="loss (mean of 50 steps)", yscale="log", title="training")
    accuracy = [(int(r["step"]), float(r["binding_acc"])) for r in rows if r.get("binding_acc") not in (None, "", "nan")]
    if accuracy:
        ax_head = ax_loss.twinx()
        ax_head.plot([a for a, _ in accuracy], smooth([b for _, b in accuracy], 200), lw=1, color="tab:purple",
                     label="binding heads (caption words)")
        concept = [(int(r["step"]), float(r["concept_acc"])) for r in rows
                   if r.get("concept_acc") not in (None, "", "nan") and float(r.get("concept") or 0) > 0]
        if concept:
            ax_head.plot([a for a, _ in concept], smooth([b for _, b in concept], 200), lw=1, color="tab:olive",
                         label="concept heads (concept rows)")
        share = [(int(r["step"]), float(r["grounding_share"])) for r in rows
                 if r.get("grounding_share") not in (None, "", "nan")]
        if share:
            ax_head.plot([a for a, _ in share], smooth([b for _, b in share], 200), lw=1, color="tab:cyan",
                         label="grounding: caption words' attention on their region")
        if concept or share:
            ax_head.legend(fontsize=7, loc="lower left")
        ax_head.set(ylabel="head accuracy / attention share", ylim=(0, 1))
        ax_head.yaxis.label.set_color("tab:purple")
    for task, colour in (("colour", "tab:red"), ("shape", "tab:blue")):
        xs = [p["step"] for p in points]
        ax_quality.plot(xs, [p[f"{task}|empty"]["best"]["identity"] for p in points], "o-", color=colour,
                        label=f"{task} identity, best block")
        ax_quality.plot(xs, [p[f"{task}|empty"]["default"]["identity"] for p in points], "o--", color=colour,
                        alpha=0.5, label=f"{task} identity, default blocks")
    generated = [(p["step"], p["generated_right_shape"]) for p in points if p.get("generated_right_shape") is not None]
    if generated:
        ax_quality.plot(*zip(*generated), "s-", color="tab:green", label="generated: right shape")
    ax_quality.axhline(0.25, color="grey", lw=0.8, ls=":", label="chance (identity)")
    ax_quality.set(xlabel="step", ylabel="fraction", ylim=(0, 1), title="ConceptAttention quality (validation scenes)")
    marks = change_steps(history)
    for ax in (ax_loss, ax_quality):
        for step in marks:
            ax.axvline(step, color="orange", lw=0.8)
    if marks:
        ax_loss.text(marks[0], ax_loss.get_ylim()[1], " recipe changes", color="orange", va="top", fontsize=8)
    hours = {int(r["step"]): float(r["wall_seconds"]) / 3600 for r in rows}
    top = ax_loss.secondary_xaxis("top", functions=(lambda s: s, lambda s: s))
    ticks = [s for s in range(0, max(steps) + 1, max(1, (max(steps) // 4 // 500) * 500 or 500))]
    top.set_xticks(ticks, [f"{hours.get(s, 0):.1f} h" for s in ticks])
    ax_quality.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(markdown_table(points))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
