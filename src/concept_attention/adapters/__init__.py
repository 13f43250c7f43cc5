"""Model-family adapters. Importing this package registers every built-in adapter."""

from .base import ModelAdapter, register_adapter, resolve_adapter, supported_transformers
from . import flux  # noqa: F401  (registers FluxAdapter)

__all__ = ["ModelAdapter", "register_adapter", "resolve_adapter", "supported_transformers"]
