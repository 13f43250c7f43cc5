"""One place that resolves what a user asked for, for every front end (Python API, CLI, web app, evaluation).

Concepts, layers, the explain timestep, image sizes and video frame counts are checked here, with
one-line messages, before any model work starts. Model defaults come from the pipeline's
``concept_attention.json`` (:func:`~concept_attention.core.defaults.pipeline_defaults`) and from its
family's adapter.
"""

from __future__ import annotations

from typing import Any

from .adapters import ModelAdapter, VideoAdapter, resolve_adapter
from .core.defaults import (
    MAX_CONCEPTS, check_concepts, default_timestep, model_default_layers, model_notice, parse_concepts,
    pipeline_defaults, resolve_layers,
)

__all__ = [
    "MAX_CONCEPTS", "adapter_of", "check_concepts", "check_num_frames", "check_request", "checked_size",
    "default_layers", "frame_count", "model_notice", "model_size", "parse_concepts", "pipeline_defaults", "resolve_layers",
    "run_size", "size_rule", "valid_frame_counts",
]


def adapter_of(pipe: Any, video: bool | None = None) -> ModelAdapter:
    """The adapter of ``pipe``'s transformer; ``video`` refuses an image model for videos and the reverse."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise TypeError(f"a diffusers pipeline with a transformer is needed, got {type(pipe).__name__}")
    adapter = resolve_adapter(transformer)
    if video is False and adapter.video:
        raise TypeError(f"{type(pipe).__name__} is a video model: give it a video (explain_video(pipe, video, "
                        "concepts); on the command line a video file such as clip.mp4)")
    if video and not adapter.video:
        raise TypeError(f"{type(pipe).__name__} is an image model: videos need a video model such as CogVideoX; "
                        "give it an image (explain(pipe, image, concepts); on the command line an image file)")
    return adapter


def default_layers(pipe: Any) -> list[int]:
    """The dual blocks a run averages when none are given (the model's defaults, else the deeper half)."""
    return model_default_layers(pipe, adapter_of(pipe))


def check_request(pipe: Any, prompt: Any, timestep: Any, num_samples: Any) -> float:
    """The noise level to explain at (the model's default when None), after checking the explain arguments."""
    if timestep is None:
        timestep = default_timestep(pipe)
    if not isinstance(timestep, (int, float)) or isinstance(timestep, bool) or not 0.0 < float(timestep) <= 1.0:
        raise ValueError(f"timestep must be a number in (0, 1], got {timestep!r}")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    return float(timestep)


# ---------------------------------------------------------------- sizes
def size_rule(pipe: Any) -> tuple[int, int]:
    """(native shorter side, multiple every side must be) in pixels of ``pipe``'s images or video frames."""
    try:
        return adapter_of(pipe).image_size_rule(pipe)
    except (NotImplementedError, TypeError, AttributeError):
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        return int(getattr(pipe, "default_sample_size", 128)) * scale, scale * 2


def model_size(width: int, height: int, native: int, multiple: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to ``native``, both rounded to ``multiple``."""
    scale = native / min(width, height)

    def snap(value: float) -> int:
        return max(multiple, int(round(value / multiple)) * multiple)

    return snap(width * scale), snap(height * scale)


def checked_size(size: Any, multiple: int) -> tuple[int, int]:
    """``size`` = (width, height) as ints, refused unless both sides are positive multiples of ``multiple``."""
    width, height = (int(v) for v in size)
    if width % multiple or height % multiple or width <= 0 or height <= 0:
        raise ValueError(f"size {width}x{height} is not accepted: both sides must be positive multiples of {multiple}")
    return width, height


def run_size(width: int, height: int, size: Any, rule: tuple[int, int]) -> tuple[int, int]:
    """(width, height) to run at: ``size`` if given (checked), else :func:`model_size` of the input's size."""
    native, multiple = rule
    return model_size(width, height, native, multiple) if size is None else checked_size(size, multiple)


# ---------------------------------------------------------------- video frames
def valid_frame_counts(ratio: int, multiple: int, up_to: int) -> list[int]:
    """Frame counts ``ratio·(L − 1) + 1`` ≤ ``up_to`` whose latent count L ≥ 2 is a multiple of ``multiple``."""
    first = _fewest_latents(multiple)
    return [ratio * (latent - 1) + 1 for latent in range(first, (up_to - 1) // ratio + 2, multiple)]


def check_num_frames(num_frames: Any, ratio: int, multiple: int) -> None:
    """Refuse a requested frame count the model does not accept (before any frame is read)."""
    is_count = isinstance(num_frames, int) and not isinstance(num_frames, bool)
    if not is_count or num_frames not in valid_frame_counts(ratio, multiple, num_frames):
        raise ValueError(f"num_frames={num_frames!r} is not accepted by this model: use {_accepted(ratio, multiple)}")


def checked_num_frames(pipe: Any, num_frames: Any) -> int:
    """``num_frames`` if ``pipe`` is a video model that accepts that many frames, else a ValueError."""
    adapter = adapter_of(pipe)
    if not isinstance(adapter, VideoAdapter):
        raise ValueError(f"num_frames is for video models; {type(pipe).__name__} makes images")
    ratio, multiple, _ = adapter.frame_rule(pipe)
    check_num_frames(num_frames, ratio, multiple)
    return int(num_frames)


def frame_count(available: int, ratio: int, multiple: int, num_frames: int | None = None) -> int:
    """How many leading frames of ``available`` to explain: ``num_frames`` if given, else the most accepted."""
    if num_frames is not None:
        check_num_frames(num_frames, ratio, multiple)
        if num_frames > available:
            raise ValueError(f"num_frames={num_frames} but the video has only {available} frames")
        return num_frames
    counts = valid_frame_counts(ratio, multiple, available)
    if not counts:
        raise ValueError(f"the video has {available} frame{'' if available == 1 else 's'}; this model needs at least "
                         f"{fewest_frames(ratio, multiple)} (it takes {_accepted(ratio, multiple)})")
    return counts[-1]


def _fewest_latents(multiple: int) -> int:
    """The smallest latent frame count explained: two frames, or one temporal patch if larger."""
    return max(2, multiple)


def fewest_frames(ratio: int, multiple: int) -> int:
    """The smallest frame count explained (5 for CogVideoX)."""
    return ratio * (_fewest_latents(multiple) - 1) + 1


def _accepted(ratio: int, multiple: int) -> str:
    """The first accepted frame counts, for messages: ``"5, 9, 13, 17, ... frames"``."""
    first = _fewest_latents(multiple)
    counts = [ratio * (latent - 1) + 1 for latent in range(first, first + 4 * multiple, multiple)]
    return ", ".join(str(n) for n in counts) + ", ... frames"


# ---------------------------------------------------------------- memory budget
ACTIVATION_COPIES = 24
"""Activations alive at once per token and transformer width (hidden states, q/k/v, MLP, concept rows), generous."""
VAE_COPIES = 6
"""Activations alive at once per pixel and VAE channel while decoding or encoding, generous."""


def free_memory(device: Any) -> int:
    """Bytes free on ``device``: CUDA's free memory, else the system's available RAM."""
    import os

    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def bytes_per_pixel(pipe: Any) -> float:
    """Memory one pixel of one image (or frame) costs at run time: transformer tokens and the VAE at full size."""
    transformer, vae = pipe.transformer, getattr(pipe, "vae", None)
    element = transformer.dtype.itemsize if hasattr(transformer.dtype, "itemsize") else 4
    multiple = size_rule(pipe)[1]
    width = int(getattr(transformer.config, "num_attention_heads", 1)) * int(
        getattr(transformer.config, "attention_head_dim", 64))
    per_token = width * element * ACTIVATION_COPIES
    channels = max(getattr(getattr(vae, "config", None), "block_out_channels", None) or (128,))
    return per_token / multiple ** 2 + int(channels) * element * VAE_COPIES


def check_budget(pipe: Any, width: int, height: int, frames: int = 1, batch: int = 1) -> None:
    """Refuse a size (or frame count) whose estimated memory exceeds what the model's device has free.

    The estimate (:func:`bytes_per_pixel`) is generous, so what passes may still be slow, but a size
    that cannot fit is refused at once with the largest square size that would.
    """
    free = free_memory(pipe.transformer.device)
    per_pixel = bytes_per_pixel(pipe) * frames * batch
    needed = per_pixel * width * height
    if needed <= free:
        return
    multiple = size_rule(pipe)[1]
    side = int((free / per_pixel) ** 0.5) // multiple * multiple
    what = f"{width}x{height}" + (f" x {frames} frames" if frames > 1 else "")
    raise ValueError(f"size {what} needs about {_gb(needed)} of memory, more than the {_gb(free)} free on "
                     f"{pipe.transformer.device}; at most about {side}x{side} fits (native: {size_rule(pipe)[0]} px)")


def _gb(count: float) -> str:
    return f"{count / 1e9:,.1f} GB" if count < 1e12 else f"{count / 1e12:,.1f} TB"
