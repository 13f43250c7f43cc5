"""Loading pipelines (the embedded default model, local directories, Hub ids) and their defaults."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .core.defaults import pipeline_defaults  # noqa: F401  (re-exported: older imports)

EMBEDDED_MODEL_DIR = Path(__file__).parent / "models" / "embedded"
"""The small FLUX-architecture pipeline trained in this repository (see its MODEL_CARD.md)."""

EMBEDDED_MODEL_ID = "embedded"
DEFAULTS_FILE = "concept_attention.json"
"""Optional file in a pipeline directory with defaults for this library (size, steps, ...)."""


class ModelLoadError(RuntimeError):
    """A pipeline could not be loaded (missing files, offline, unsupported)."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was requested but no CUDA GPU is available")
    return resolved


def resolve_dtype(dtype: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are emulated and slow there), bf16 on GPU, unless given."""
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return table[dtype]


def load_pipeline(model: str | Path | None = None, device: str = "auto", dtype: str = "auto") -> Any:
    """A diffusers pipeline from the embedded model (``None``/"embedded"), a local directory or a Hub id.

    Raises :class:`ModelLoadError` with a one-line reason when the model cannot be loaded; with no
    network and ``HF_HUB_OFFLINE=1`` a Hub id that is not cached fails at once.
    """
    from diffusers import DiffusionPipeline

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if model is None or str(model) == EMBEDDED_MODEL_ID:
        path = EMBEDDED_MODEL_DIR
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"the embedded model is missing from this installation ({path})")
        source: str | Path = path
    else:
        path = Path(model).expanduser()
        if path.exists():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
            source = path
        else:
            source = str(model)
            if source.count("/") != 1 or source.startswith((".", "/", "~")):
                raise ModelLoadError(f"no directory {source} and it is not a Hugging Face Hub id (owner/name)")
    try:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=torch_dtype)
    except Exception as error:  # diffusers/hub raise many types; report one line
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(source, str):
            hint = (" (offline: HF_HUB_OFFLINE is set and the model is not in the local cache)" if offline
                    else " (no network access, or no such model on the Hub?)")
            raise ModelLoadError(f"cannot load {source!r}{hint}: {reason}") from None
        raise ModelLoadError(f"cannot load the pipeline in {source}: {reason}") from None
    pipe = pipe.to(target)
    apply_defaults(pipe, Path(source) if not isinstance(source, str) else None)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_id = EMBEDDED_MODEL_ID if source == EMBEDDED_MODEL_DIR else str(model)
    return pipe


def apply_defaults(pipe: Any, directory: Path | None) -> dict[str, Any]:
    """Read ``concept_attention.json`` from a pipeline directory and attach it to the pipeline."""
    defaults: dict[str, Any] = {}
    if directory is not None and (directory / DEFAULTS_FILE).is_file():
        defaults = json.loads((directory / DEFAULTS_FILE).read_text())
    pipe.concept_attention_defaults = defaults
    size = defaults.get("size")
    scale = getattr(pipe, "vae_scale_factor", None)
    if size and scale and hasattr(pipe, "default_sample_size"):
        pipe.default_sample_size = int(size) // int(scale)
    return defaults
