"""Import a script of the repository (benchmarks/, scripts/) as a module, for tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, name: str | None = None) -> ModuleType:
    """The module of ``ROOT / relative_path`` (e.g. ``"benchmarks/scenes.py"``), freshly executed."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (and pickling) look a module up by name
    spec.loader.exec_module(module)
    return module
