"""Model-family adapters. Importing this package registers every built-in adapter."""

from .base import ModelAdapter, register_adapter, resolve_adapter, supported_transformers
from . import flux  # noqa: F401  (registers FluxAdapter)
from . import flux2  # noqa: F401  (registers Flux2Adapter)
from . import cogvideox  # noqa: F401  (registers CogVideoXAdapter)
from . import sd3  # noqa: F401  (registers SD3Adapter)
from . import chroma  # noqa: F401  (registers ChromaAdapter)

__all__ = ["ModelAdapter", "register_adapter", "resolve_adapter", "supported_transformers"]
