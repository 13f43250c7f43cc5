"""Library defaults a pipeline carries (``concept_attention.json``) and the rules that resolve options from them.

Every front end (the Python API, the CLI, the web app, the evaluation) resolves layers, the
explain timestep and the concept list through these functions, so they agree.
"""

from __future__ import annotations

from typing import Any, Iterable

DEFAULT_TIMESTEP = 0.5
"""Noise level at which real images are explained when the model sets none (the paper's t = 500 of 1000)."""

MAX_CONCEPTS = 50
"""Most concepts one run takes (every front end)."""


def pipeline_defaults(pipe: Any) -> dict[str, Any]:
    """Library defaults attached to a pipeline by ``load_pipeline`` (empty for pipelines built elsewhere)."""
    return dict(getattr(pipe, "concept_attention_defaults", {}) or {})


def model_notice(pipe: Any) -> str | None:
    """What the model's makers ask every display of its maps to say (``concept_attention.json``'s ``notice``,
    e.g. that the maps of some blocks were a training target), or ``None``."""
    notice = pipeline_defaults(pipe).get("notice")
    return str(notice) if notice else None


def default_timestep(pipe: Any) -> float:
    """The model's explain timestep (``concept_attention.json``), else :data:`DEFAULT_TIMESTEP`."""
    return float(pipeline_defaults(pipe).get("timestep", DEFAULT_TIMESTEP))


def non_empty_list(value: Any, name: str, expected: str, hint: str = "") -> list[Any]:
    """``value`` as a list; a TypeError if it is not iterable, a ValueError if it is empty."""
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}") from None
    if not items:
        raise ValueError(f"{name} is empty" + (f": {hint}" if hint else ""))
    return items


def check_concepts(concepts: Any) -> list[str]:
    """Concept names, stripped; refuses a bare string, empty names, duplicates (ignoring case) and too many."""
    if isinstance(concepts, str):
        raise TypeError("concepts must be a list of strings, e.g. ['dog', 'sky'], not a single string")
    items = non_empty_list(concepts, "concepts", "a list of strings",
                           "give at least one concept, e.g. concepts=['dog', 'background']")
    if len(items) > MAX_CONCEPTS:
        raise ValueError(f"{len(items)} concepts given; at most {MAX_CONCEPTS} are supported in one run")
    names: list[str] = []
    seen: dict[str, str] = {}
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"every concept must be a string, got {item!r} ({type(item).__name__})")
        name = item.strip()
        if not name:
            raise ValueError("concepts contains an empty string")
        if name.lower() in seen:
            raise ValueError(f"duplicate concept {name!r} (also given as {seen[name.lower()]!r})")
        seen[name.lower()] = name
        names.append(name)
    return names


def parse_concepts(text: str) -> list[str]:
    """A comma-separated concept list (command line, web app) checked by :func:`check_concepts`."""
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise ValueError("no concepts given: list them separated by commas, e.g. dog,tree,sky")
    return check_concepts(items)


def resolve_layers(layers: Iterable[int] | int | None, count: int, default: Iterable[int]) -> list[int]:
    """Sorted dual-block indices (negative counts from the end); ``default`` when ``layers`` is None."""
    if layers is None:
        layers = [int(layer) for layer in default]
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    items = non_empty_list(layers, "layers", "a list of block indices")
    resolved = set()
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer indices must be integers, got {layer!r}")
        if not -count <= layer < count:
            raise ValueError(f"layer {layer} is out of range: this model has {count} dual-stream blocks (0–{count - 1})")
        resolved.add(layer % count)
    return sorted(resolved)


def model_default_layers(pipe: Any, adapter: Any) -> list[int]:
    """The layers a run uses when none are given: the model's ``concept_attention.json``, else the adapter's."""
    return [int(layer) for layer in (pipeline_defaults(pipe).get("layers") or adapter.default_layers())]
