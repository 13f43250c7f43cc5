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
    MAX_CONCEPTS, check_concepts, default_timestep, model_default_layers, parse_concepts, pipeline_defaults,
    resolve_layers,
)

__all__ = [
    "MAX_CONCEPTS", "adapter_of", "check_concepts", "check_num_frames", "check_request", "checked_size",
    "default_layers", "frame_count", "model_size", "parse_concepts", "pipeline_defaults", "resolve_layers",
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
