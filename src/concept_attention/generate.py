"""Generate an image and its concept maps in one call (what the CLI and the web app use)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch

from .core.maps import ConceptMaps
from .core.session import ConceptAttention
from .loading import pipeline_defaults
from .viz import to_rgb_image


def generate(
    pipe: Any,
    prompt: str,
    concepts: Sequence[str],
    *,
    steps: int | None = None,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    num_frames: int | None = None,
    layers: Sequence[int] | None = None,
    timesteps: Sequence[int] | None = None,
    space: str = "output",
    compare: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    **options: Any,
) -> ConceptMaps:
    """Run the pipeline on ``prompt`` and return the maps of ``concepts`` with ``maps.image`` set.

    For a video pipeline (output ``.frames``) ``maps.frames`` holds the first video's frames and
    ``maps.save`` writes one heat-map video per concept.

    ``size`` is (width, height); ``steps`` defaults to the model's recommendation (or the
    pipeline's own default). ``num_frames`` (video models only) is the number of frames to generate,
    a count the model accepts (CogVideoX: 4k+1); by default the pipeline's own. With ``compare`` the
    raw cross-attention maps of the same run are kept in ``maps.others["cross_attention"]``. ``on_step(done, total)`` reports progress.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    defaults = pipeline_defaults(pipe)
    call: dict[str, Any] = {}
    if steps is None:
        steps = defaults.get("num_inference_steps")
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        call["num_inference_steps"] = steps
    if size is not None:
        width, height = size
        call["width"], call["height"] = int(width), int(height)
        multiple = size_rule(pipe)[1]
        if call["width"] % multiple or call["height"] % multiple or min(call["width"], call["height"]) <= 0:
            raise ValueError(f"size {width}x{height} is not accepted: both sides must be positive multiples of {multiple}")
    if num_frames is not None:
        call["num_frames"] = checked_num_frames(pipe, num_frames)
    parameters = inspect.signature(type(pipe).__call__).parameters
    if "max_sequence_length" in defaults and "max_sequence_length" in parameters:
        call["max_sequence_length"] = int(defaults["max_sequence_length"])
    for key in ("guidance_scale", "true_cfg_scale", "negative_prompt"):
        if key in defaults and key in parameters:
            call[key] = defaults[key]
    total = call.get("num_inference_steps") or (parameters["num_inference_steps"].default
                                                if "num_inference_steps" in parameters else 0)
    if on_step is not None and "callback_on_step_end" in parameters:
        def callback(pipeline: Any, index: int, timestep: Any, kwargs: dict) -> dict:
            on_step(index + 1, int(total))
            return kwargs

        call["callback_on_step_end"] = callback
    spaces = [space] + (["cross_attention"] if compare and space != "cross_attention" else [])
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with ConceptAttention(
        pipe, concepts, layers=layers, timesteps=timesteps, space=spaces,
        max_sequence_length=call.get("max_sequence_length"), **options,
    ) as session:
        output = pipe(prompt=prompt, generator=generator, **call)
    maps = session.maps
    video = getattr(output, "frames", None) if getattr(output, "images", None) is None else None
    if video is not None:  # video pipelines (e.g. CogVideoX): keep the first video's frames
        from .video import to_frames

        maps.frames = to_frames(video[0])
        image = maps.frames[0]
        maps.meta["num_frames"] = len(maps.frames)
    else:
        image = to_rgb_image(output.images[0])
        maps.image = image
    maps.meta.update(
        {
            "mode": "generate",
            "prompt": prompt,
            "seed": int(seed),
            "num_inference_steps": int(total) if total else None,
            **{key: call[key] for key in ("guidance_scale", "true_cfg_scale") if key in call},
            "image_size": [image.width, image.height],
            "model_id": getattr(pipe, "model_id", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None),
        }
    )
    return maps


def checked_num_frames(pipe: Any, num_frames: Any) -> int:
    """``num_frames`` if ``pipe`` is a video model that accepts that many frames, else a ValueError."""
    from .adapters import resolve_adapter
    from .video_explain import check_num_frames

    transformer = getattr(pipe, "transformer", None)
    adapter = resolve_adapter(transformer) if transformer is not None else None
    if adapter is None or not adapter.video:
        raise ValueError(f"num_frames is for video models; {type(pipe).__name__} makes images")
    ratio, multiple, _ = adapter.frame_rule(pipe)
    check_num_frames(num_frames, ratio, multiple)
    return int(num_frames)


def size_rule(pipe: Any) -> tuple[int, int]:
    """(native shorter side, multiple every side must be) in pixels of ``pipe``'s images or video frames."""
    from .adapters import resolve_adapter

    try:
        return resolve_adapter(pipe.transformer).image_size_rule(pipe)
    except (NotImplementedError, TypeError, AttributeError):
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        return int(getattr(pipe, "default_sample_size", 128)) * scale, scale * 2
