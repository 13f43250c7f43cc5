"""Model-family adapters, one module per family; importing this package registers every one of them.

Each family module defines a :class:`~concept_attention.core.contract.ModelAdapter` subclass decorated
with :func:`~concept_attention.core.contract.register_adapter`. Modules are found by listing this
package, so adding a family is adding its file (see ``docs/adding-a-family.md``).
"""

import importlib
import pkgutil

from ..core.contract import (
    ModelAdapter, VideoAdapter, register_adapter, registered_adapters, resolve_adapter, supported_transformers,
)

SHARED_MODULES = frozenset({"common", "encoding", "wrapping"})
"""Helpers several families use; every other module of this package is a family."""

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in SHARED_MODULES and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ModelAdapter", "VideoAdapter", "register_adapter", "registered_adapters", "resolve_adapter",
           "supported_transformers"]
