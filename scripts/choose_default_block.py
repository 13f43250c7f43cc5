"""Choose the embedded model's default ConceptAttention blocks on the validation scenes.

    python scripts/choose_default_block.py docs/results/embedded/validation/scenes.json          # print
    python scripts/choose_default_block.py docs/results/embedded/validation/scenes.json --write  # and set

The score of a choice is its ConceptAttention multi-class mIoU averaged over both tasks (colour, shape)
and both prompts (caption, empty), as `benchmarks/scenes.py --split validation` measured it. Candidates
are each single block and all blocks together. `--write` stores the winner as `"layers"` in the packaged
`concept_attention.json`; the test scenes are never looked at.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "src/concept_attention/models/embedded/concept_attention.json"
_BLOCK = re.compile(r"^ConceptAttention block (\d+)$")


def candidate_scores(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean mIoU per candidate ("block N" or "all blocks") over every task and prompt it was scored on."""
    scores: dict[str, list[float]] = {}
    for key, row in results.items():
        _task, prompt, method = key.split("|", 2)
        if prompt == "-":
            continue
        match = _BLOCK.match(method)
        if match:
            name = f"block {match.group(1)}"
        elif method == "ConceptAttention (all blocks)":
            name = "all blocks"
        else:
            continue
        scores.setdefault(name, []).append(row["miou"])
    return {name: sum(v) / len(v) for name, v in scores.items() if v and not any(math.isnan(x) for x in v)}


def layers_for(name: str, candidates: list[str]) -> list[int]:
    """The `layers` value for a candidate name ("all blocks" lists every scored block)."""
    if name == "all blocks":
        return sorted(int(c.split()[1]) for c in candidates if c.startswith("block "))
    return [int(name.split()[1])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenes_json", type=Path, help="scenes.json written by benchmarks/scenes.py --split validation")
    ap.add_argument("--write", action="store_true", help=f"set the winner as 'layers' in {CONFIG.name}")
    args = ap.parse_args(argv)

    data = json.loads(args.scenes_json.read_text())
    if data.get("meta", {}).get("split") != "validation":
        print(f"error: {args.scenes_json} is not a validation run; choose settings on validation scenes only",
              file=sys.stderr)
        return 2
    scores = candidate_scores(data["results"])
    if not scores:
        print(f"error: no per-block ConceptAttention rows in {args.scenes_json}", file=sys.stderr)
        return 2
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    print("mean ConceptAttention mIoU over both tasks and both prompts, "
          f"{data['meta'].get('scenes')} validation scenes:")
    print("; ".join(f"{name}: {score:.3f}" for name, score in ranked))
    best = ranked[0][0]
    print(f"best: {best}")
    if args.write:
        config = json.loads(CONFIG.read_text())
        config["layers"] = layers_for(best, list(scores))
        CONFIG.write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote layers={config['layers']} to {CONFIG.relative_to(CONFIG.parents[4])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
