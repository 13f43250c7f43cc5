"""The zero-shot segmentation runner (paper §5.2): resumable, sharded, one record per image.

For every image the runner explains it with a concept vocabulary of the image's class names plus
fixed background concepts, then scores

* **binary** (single-class data): the target's map, bilinearly upsampled to the mask, thresholded
  at its mean → pixel accuracy, mIoU, AP (see :mod:`.metrics`);
* **multi-class** (VOC full set, synthetic scenes): per-pixel argmax over concepts, background
  concepts → class 0 → pixel accuracy and mIoU over classes.

Records go to ``per_image.rank<r>.jsonl`` (one line per image and configuration), so an
interrupted run resumes where it stopped and shards of a data-parallel run (``accelerate
launch``) write disjoint files; rank 0 merges them, sorted by image id, into ``summary.json``
and ``table.md``. Noise is seeded per image id, so results do not depend on the sharding.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..core.maps import ConceptMaps
from ..viz import upsample
from .metrics import BinarySegmentationAccumulator, ConfusionMatrix, binary_scores, multiclass_scores

DEFAULT_BACKGROUND = ("background", "grass", "sky")


@dataclass(frozen=True)
class MethodConfig:
    """One way of computing maps (a row of the paper's tables)."""

    name: str
    space: str = "output"
    softmax: bool = True
    concept_self_attention: bool = True
    concept_cross_attention: bool = True
    layers: tuple[int, ...] | None = None
    timestep: float = 0.5

    @property
    def key(self) -> str:
        return self.name


def ablation_methods(ablation: str | None, base: MethodConfig, num_layers: int | None = None,
                     timesteps: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> list[MethodConfig]:
    """The configurations of a paper sweep (Table 3, Table 4, per-layer, per-timestep)."""
    if ablation is None:
        return [base]
    if ablation == "table3":
        rows = []
        for space, label in (("cross_attention", "cross-attention"), ("value", "value space"),
                             ("output", "output space")):
            for softmax in (False, True):
                rows.append(replace(base, name=f"{label}{' + softmax' if softmax else ''}", space=space,
                                    softmax=softmax))
        return rows
    if ablation == "table4":
        return [
            replace(base, name="no self, no cross", concept_self_attention=False, concept_cross_attention=False),
            replace(base, name="self only", concept_self_attention=True, concept_cross_attention=False),
            replace(base, name="cross only", concept_self_attention=False, concept_cross_attention=True),
            replace(base, name="cross + self", concept_self_attention=True, concept_cross_attention=True),
        ]
    if ablation == "layers":
        if not num_layers:
            raise ValueError("the layers ablation needs the model's number of dual blocks")
        rows = [replace(base, name=f"layer {i}", layers=(i,)) for i in range(num_layers)]
        return rows + [replace(base, name="all layers", layers=tuple(range(num_layers)))]
    if ablation == "timesteps":
        return [replace(base, name=f"t={t:g}", timestep=float(t)) for t in timesteps]
    raise ValueError(f"unknown ablation {ablation!r}; choose table3, table4, layers or timesteps")


@dataclass
class EvalSettings:
    """Everything that defines one evaluation run (stored in ``settings.json``)."""

    dataset: str
    protocol: str  # "binary" or "multiclass"
    background: tuple[str, ...] = DEFAULT_BACKGROUND
    prompt: str = ""
    num_samples: int = 1
    seed: int = 0
    size: tuple[int, int] | None = None
    model: str | None = None
    limit: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def image_seed(seed: int, image_id: str) -> int:
    """A per-image seed independent of order and sharding."""
    return (int(seed) * 1_000_003 + zlib.crc32(image_id.encode())) % (2**31)


def vocabulary(class_names: Sequence[str], background: Sequence[str]) -> list[str]:
    """Class names first, then background concepts not already named (case-insensitive)."""
    seen = {name.lower() for name in class_names}
    return list(class_names) + [b for b in background if b.lower() not in seen]


def score_maps(maps: ConceptMaps, sample: Any, protocol: str, num_classes: int) -> dict[str, Any]:
    """Per-image scores as a JSON-able record (enough to rebuild dataset-level accumulators)."""
    height, width = sample.mask.shape
    soft = upsample(maps.tensor[0], (height, width))  # (C, H, W)
    if protocol == "binary":
        target = soft[0].numpy()
        gt = sample.binary_mask()
        scores = binary_scores(target, gt, ignore_index=255)
        return {
            "pixel_accuracy": _clean(scores.pixel_accuracy), "miou": _clean(scores.miou),
            "ap": _clean(scores.ap), "ap_two_channel": _clean(scores.ap_two_channel),
            "confusion": scores.confusion.tolist(),
        }
    labels_per_concept = list(sample.class_indices) + [0] * (soft.shape[0] - len(sample.class_indices))
    argmax = soft.argmax(dim=0).numpy()
    predicted = np.asarray(labels_per_concept, dtype=np.int64)[argmax]
    scores = multiclass_scores(predicted, sample.mask, num_classes, ignore_index=255)
    return {
        "pixel_accuracy": _clean(scores.pixel_accuracy), "miou": _clean(scores.miou),
        "confusion": scores.confusion.tolist(),
    }


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def summarise(records: Iterable[dict[str, Any]], protocol: str, num_classes: int) -> dict[str, dict[str, Any]]:
    """Dataset-level summaries per method from per-image records (sorted by id first)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for record in sorted(records, key=lambda r: (r["method"], r["id"])):
        by_method.setdefault(record["method"], []).append(record)
    summaries = {}
    for method, rows in by_method.items():
        if protocol == "binary":
            acc = BinarySegmentationAccumulator()
            for row in rows:
                acc.confusion.add(np.asarray(row["confusion"], dtype=np.int64), _nan(row["pixel_accuracy"]),
                                  _nan(row["miou"]))
                acc.image_ap.append(_nan(row["ap"]))
                acc.image_ap_two_channel.append(_nan(row["ap_two_channel"]))
            summaries[method] = acc.summary()
        else:
            matrix = ConfusionMatrix(num_classes)
            for row in rows:
                matrix.add(np.asarray(row["confusion"], dtype=np.int64), _nan(row["pixel_accuracy"]),
                           _nan(row["miou"]))
            summaries[method] = matrix.summary()
    return summaries


def markdown_table(summaries: dict[str, dict[str, Any]], protocol: str, order: Sequence[str]) -> str:
    """The paper's layout: one row per method; Acc, mIoU (and mAP for the binary protocol), in %."""
    if protocol == "binary":
        lines = ["| Method | Acc ↑ | mIoU ↑ | mAP ↑ | images |", "|---|---|---|---|---|"]
    else:
        lines = ["| Method | Acc ↑ | mIoU ↑ | images |", "|---|---|---|---|"]
    for name in order:
        if name not in summaries:
            continue
        s = summaries[name]
        cells = [f"{100 * s['pixel_accuracy']:.2f}", f"{100 * s['miou']:.2f}"]
        if protocol == "binary":
            cells.append(f"{100 * s['mean_ap']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['num_images']} |")
    return "\n".join(lines) + "\n"


class Runner:
    """Runs methods over a data set shard, appending one JSON line per (image, method)."""

    def __init__(self, pipe: Any, samples: Sequence[Any], settings: EvalSettings, methods: list[MethodConfig],
                 out: Path, rank: int = 0, num_classes: int = 21,
                 progress: Callable[[int, int, str], None] | None = None) -> None:
        self.pipe = pipe
        self.samples = samples
        self.settings = settings
        self.methods = methods
        self.out = Path(out)
        self.rank = rank
        self.num_classes = num_classes
        self.progress = progress

    @property
    def records_path(self) -> Path:
        return self.out / f"per_image.rank{self.rank}.jsonl"

    def done(self) -> set[tuple[str, str]]:
        """(image id, method) pairs already recorded by any rank (to resume)."""
        finished = set()
        for record in read_records(self.out):
            finished.add((record["id"], record["method"]))
        return finished

    def run(self) -> int:
        from ..explanation import explain

        self.out.mkdir(parents=True, exist_ok=True)
        _drop_torn_line(self.records_path)
        finished = self.done()
        written = 0
        total = len(self.samples)
        for position, sample in enumerate(self.samples):
            todo = [m for m in self.methods if (sample.id, m.key) not in finished]
            if self.progress:
                self.progress(position, total, sample.id)
            if not todo:
                continue
            concepts = vocabulary(sample.class_names, self.settings.background)
            for group in _group_methods(todo):
                started = time.perf_counter()
                first = group[0]
                spaces = [m.space for m in group]
                all_layers = sorted({layer for m in group for layer in (m.layers or ())}) or None
                maps = explain(
                    self.pipe, sample.image, concepts, prompt=self.settings.prompt, timestep=first.timestep,
                    num_samples=self.settings.num_samples, seed=image_seed(self.settings.seed, sample.id),
                    layers=all_layers, size=self.settings.size, space=list(dict.fromkeys(spaces)),
                    softmax=first.softmax, concept_self_attention=first.concept_self_attention,
                    concept_cross_attention=first.concept_cross_attention,
                )
                seconds = time.perf_counter() - started
                for method in group:
                    space_maps = maps if method.space == maps.space else maps.others[method.space]
                    if method.layers is not None and all_layers is not None and list(method.layers) != all_layers:
                        space_maps = space_maps.for_layers(list(method.layers))
                    record = {
                        "id": sample.id, "method": method.key, "classes": list(sample.class_names),
                        "concepts": concepts, "layers": space_maps.layers, "seconds": round(seconds, 4),
                        **score_maps(space_maps, sample, self.settings.protocol, self.num_classes),
                    }
                    with self.records_path.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    written += 1
        if self.progress:
            self.progress(total, total, "")
        return written


def _group_methods(methods: list[MethodConfig]) -> list[list[MethodConfig]]:
    """Methods that can share one explain pass (same softmax, ablation switches and timestep)."""
    groups: dict[tuple, list[MethodConfig]] = {}
    for method in methods:
        key = (method.softmax, method.concept_self_attention, method.concept_cross_attention, method.timestep)
        groups.setdefault(key, []).append(method)
    return list(groups.values())


def _drop_torn_line(path: Path) -> None:
    """Cut an unfinished last line left by an interrupted run, so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def read_records(out: Path) -> list[dict[str, Any]]:
    """All per-image records of a run directory (every rank), skipping a torn last line."""
    records = []
    for path in sorted(Path(out).glob("per_image.rank*.jsonl")):
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # an interrupted write; the image is redone on resume
    return records


def write_summary(out: Path, settings: EvalSettings, methods: list[MethodConfig], num_classes: int) -> dict[str, Any]:
    """Merge every rank's records into ``summary.json`` and ``table.md``."""
    keys = [m.key for m in methods]
    records = [r for r in read_records(out) if r["method"] in keys]
    unique: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        unique.setdefault((record["id"], record["method"]), record)
    summaries = summarise(unique.values(), settings.protocol, num_classes)
    summary = {
        "settings": {**asdict(settings), "background": list(settings.background)},
        "methods": [asdict(m) for m in methods],
        "results": summaries,
    }
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    title = f"{settings.dataset} ({settings.protocol} protocol, model {settings.model or 'embedded'})"
    (Path(out) / "table.md").write_text(f"### {title}\n\n" + markdown_table(summaries, settings.protocol, keys))
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


class ResumeError(ValueError):
    """A result folder holds records made with other settings: resuming would mix them."""


RESULT_FILES = ("per_image.rank*.jsonl", "summary.json", "table.md", "settings.json")


def run_fingerprint(settings: EvalSettings, methods: list[MethodConfig]) -> dict[str, Any]:
    """Every setting that changes a number (not the image limit or the sharding), for ``settings.json``."""
    from .._version import __version__

    return {"model": settings.model or "embedded", "dataset": settings.dataset, "protocol": settings.protocol,
            "background": list(settings.background), "prompt": settings.prompt, "samples": settings.num_samples,
            "seed": settings.seed, "size": list(settings.size) if settings.size else None,
            "methods": [json.loads(json.dumps(asdict(m))) for m in methods], "library_version": __version__}


def differing_setting(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first setting whose value differs, as ``"timestep (0.5 in the folder, 0.9 now)"``; None if all match."""
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key), new.get(key)
        if key == "methods" and isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
            for old_method, new_method in zip(before, now):
                inner = differing_setting(old_method, new_method)
                if inner:
                    return inner
        elif before != now:
            return f"{key} ({before!r} in the folder, {now!r} now)"
    return None


def prepare_folder(out: Path, fingerprint: dict[str, Any], overwrite: bool = False) -> None:
    """Make ``out`` ready for this run: refuse to resume records made with other settings, unless ``overwrite``
    (which deletes the folder's earlier results); then record the settings."""
    out.mkdir(parents=True, exist_ok=True)
    existing = [path for pattern in RESULT_FILES for path in out.glob(pattern)]
    if overwrite:
        for path in existing:
            path.unlink()
    elif read_records(out):
        recorded = _read_json(out / "settings.json").get("fingerprint")
        if recorded is None:
            raise ResumeError(f"{out} holds results whose settings were not recorded: use a new --out, or "
                              "--overwrite to start afresh")
        difference = differing_setting(recorded, fingerprint)
        if difference:
            raise ResumeError(f"{out} holds results made with another {difference}: use a new --out, or "
                              "--overwrite to start afresh")
    (out / "settings.json").write_text(json.dumps({"fingerprint": fingerprint}, indent=2))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
