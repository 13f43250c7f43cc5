"""Parsing of command-line values (light: no torch)."""

from __future__ import annotations

import re
from pathlib import Path

from ..core.defaults import parse_concepts as _parse_concepts

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """A command-line argument the user has to fix."""


# ---------------------------------------------------------------- argument parsing helpers
def parse_concepts(text: str) -> list[str]:
    """``--concepts`` with the one concept rule every front end uses (``core.defaults.parse_concepts``)."""
    if not any(item.strip() for item in text.split(",")):
        raise UsageError("--concepts is empty: give a comma-separated list, e.g. --concepts dog,tree,sky")
    try:
        return _parse_concepts(text)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--concepts: {error}") from None


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


def writable_folder(path: str | Path) -> Path:
    """``path`` as an output folder we can write to, created if needed; a UsageError before any model work."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (it will hold the images, maps and metadata)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".concept-attention-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"cannot write to --out {out}: {error.strerror or error}") from None
    return out
