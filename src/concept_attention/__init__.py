"""ConceptAttention for diffusers multi-modal diffusion transformers.

>>> from concept_attention import ConceptAttention
>>> with ConceptAttention(pipe, concepts=["dog", "sky"]) as ca:   # doctest: +SKIP
...     image = pipe("a dog").images[0]
>>> ca.maps["dog"].shape                                          # doctest: +SKIP

The public names load on first use, so ``import concept_attention`` (and the command line's
``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_PUBLIC = {
    "ConceptAttention": "api", "ConceptMaps": "api", "SPACES": "api", "explain": "api", "explain_video": "api",
    "generate": "api", "load_image": "api", "load_pipeline": "api",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
