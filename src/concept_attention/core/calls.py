"""Which transformer calls are mapped: explicit signals about pipeline calls and classifier-free guidance.

Three hooks, each undone when the session ends:

* on the **transformer** (or the ``torch.compile`` wrapper that is called instead): its class-level
  ``__call__`` marks the start and end of each call, outside any compiled code;
* on the transformer's ``cache_context`` (the context manager diffusers pipelines wrap their
  conditional and unconditional calls in, e.g. ``"cond"``/``"uncond"``): an instance-level wrapper
  records the current context name;
* on the session's **pipeline** (when one was given): its ``__call__`` is wrapped (the instance gets a
  subclass of its own class for the duration of the session) so the session knows when *its* pipeline
  is running and with which arguments.

:func:`call_layout` turns these into one CFG layout per call (see ``CFG_LAYOUTS``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .contract import CFG_LAYOUTS


@dataclass
class CallSignals:
    """What the hooks have seen: the cache-context name and the running pipeline call, if any."""

    context_name: str | None = None
    pipeline_call: inspect.BoundArguments | None = None
    previous_timestep: Any = None


def check_cfg(cfg: Any) -> str:
    if cfg not in CFG_LAYOUTS:
        raise ValueError(f"cfg must be one of {', '.join(CFG_LAYOUTS)}, not {cfg!r}")
    return str(cfg)


def call_layout(cfg: str, signals: CallSignals, pipeline_layout: Callable[[inspect.BoundArguments], str]) -> str:
    """The CFG layout of the call in progress: the user's choice, else the running pipeline's, else by context."""
    if cfg != "auto":
        return cfg
    if signals.pipeline_call is not None:
        return pipeline_layout(signals.pipeline_call)
    return "context" if signals.context_name is not None else "none"


def is_conditional(layout: str, signals: CallSignals, timestep: Any) -> bool:
    """Whether a call is the conditional (mapped) one under ``layout``."""
    if layout == "context":
        name = signals.context_name
        return name is None or "uncond" not in name.lower() or "cond_uncond" in name.lower()
    if layout == "sequential":  # first call of a denoising step is the conditional one
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else timestep
        first = value != signals.previous_timestep
        signals.previous_timestep = value
        return first
    return True


_CALL_WATCHERS = "_concept_attention_call_watchers"
_WATCHED_CLASSES: dict[type, type] = {}


def hook_transformer_calls(transformer: nn.Module, before: Callable[[tuple, dict], None],
                           after: Callable[[], None]) -> Callable[[], None]:
    """Call ``before(args, kwargs)`` and ``after()`` around every call of ``transformer``; returns the undo.

    The instance gets a subclass of its own class (one per class, reused by every session, so that
    ``torch.compile``'s guards on the module's type see the same two types again and again) whose
    ``__call__`` runs the watchers and then the class's own ``__call__``. The watchers thus run
    eagerly, before any compiled code (``transformer.compile()``, ``torch.compile(transformer)``,
    ``compile_repeated_blocks``): their Python bookkeeping causes no graph break and no recompilation.
    """
    cls = type(transformer)
    watched = cls if getattr(cls, "_concept_attention_watched", False) else _watched_class(cls)
    transformer.__dict__[_CALL_WATCHERS] = (before, after)
    transformer.__class__ = watched

    def undo() -> None:
        transformer.__dict__.pop(_CALL_WATCHERS, None)
        if type(transformer) is watched and watched is not cls:
            transformer.__class__ = cls

    return undo


def _watched_class(cls: type) -> type:
    watched = _WATCHED_CLASSES.get(cls)
    if watched is not None:
        return watched
    base_call = cls.__call__

    @torch.compiler.disable(recursive=False)  # this frame only: the call inside is compiled as usual
    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        watchers = self.__dict__.get(_CALL_WATCHERS)
        if watchers is None:
            return base_call(self, *args, **kwargs)
        before, after = watchers
        before(args, kwargs)
        try:
            return base_call(self, *args, **kwargs)
        finally:
            after()

    watched = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "_concept_attention_watched": True})
    _WATCHED_CLASSES[cls] = watched
    return watched


def watch_cache_context(transformer: nn.Module, signals: CallSignals) -> Callable[[], None]:
    """Record the name of every ``transformer.cache_context(name)`` block in ``signals``; returns the undo.

    The instance gets a ``cache_context`` attribute wrapping the one it had (its class's, or an instance
    attribute someone else put there, which the undo puts back).
    """
    original = getattr(transformer, "cache_context", None)
    if original is None:
        return lambda: None
    missing = object()
    previous = transformer.__dict__.get("cache_context", missing)

    @contextlib.contextmanager
    def cache_context(name: str, *args: Any, **kwargs: Any):  # e.g. step_index=, sigma= (read by caches)
        outer, signals.context_name = signals.context_name, name
        try:
            with original(name, *args, **kwargs):
                yield
        finally:
            signals.context_name = outer

    transformer.__dict__["cache_context"] = cache_context

    def undo() -> None:
        if transformer.__dict__.get("cache_context") is cache_context:
            if previous is missing:
                del transformer.__dict__["cache_context"]
            else:
                transformer.__dict__["cache_context"] = previous

    return undo


def watch_pipeline_calls(pipeline: Any, signals: CallSignals) -> Callable[[], None]:
    """Record each running ``pipeline(...)`` call's bound arguments in ``signals``; returns the undo.

    Python looks ``__call__`` up on the class, so the instance gets a subclass of its own class whose
    ``__call__`` wraps the original (same signature); the undo puts the original class back.
    """
    cls = type(pipeline)
    original = cls.__call__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        outer = signals.pipeline_call
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:  # a wrong call: let the pipeline report it
            return original(self, *args, **kwargs)
        bound.apply_defaults()
        signals.pipeline_call, signals.previous_timestep = bound, None
        try:
            return original(self, *args, **kwargs)
        finally:
            signals.pipeline_call = outer

    watched = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
    pipeline.__class__ = watched

    def undo() -> None:
        if type(pipeline) is watched:
            pipeline.__class__ = cls

    return undo
