"""Generate an image (or video) and its concept maps in one call (what the CLI and the web app use)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch

from . import saving  # noqa: F401  (the views behind ConceptMaps.save/load)
from .core.defaults import pipeline_defaults
from .core.maps import ConceptMaps
from .core.session import ConceptAttention
from .options import check_budget, checked_num_frames, checked_size, size_rule
from .viz import to_rgb_image


def generate(pipe: Any, prompt: str, concepts: Sequence[str], *, steps: int | None = None, seed: int = 0,
             size: tuple[int, int] | None = None, num_frames: int | None = None, layers: Sequence[int] | None = None,
             timesteps: Sequence[int] | None = None, space: str = "output", compare: bool = True,
             on_step: Callable[[int, int], None] | None = None, **options: Any) -> ConceptMaps:
    """Run the pipeline on ``prompt`` and return the maps of ``concepts`` with ``maps.image`` set.

    For a video pipeline (output ``.frames``) ``maps.frames`` holds the first video's frames and
    ``maps.save`` writes one heat-map video per concept.

    ``size`` is (width, height); ``steps`` defaults to the model's recommendation (or the
    pipeline's own default). ``num_frames`` (video models only) is the number of frames to generate,
    a count the model accepts (CogVideoX: 4k+1); by default the pipeline's own. With ``compare`` the
    raw cross-attention maps of the same run are kept in ``maps.others["cross_attention"]``.
    ``on_step(done, total)`` reports progress.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    call = pipeline_call(pipe, steps, size, num_frames)
    check_timesteps(timesteps, call.get("num_inference_steps"))
    warn_if_truncated(pipe, prompt, call.get("max_sequence_length"))
    if on_step is not None and "callback_on_step_end" in _call_parameters(pipe):
        call["callback_on_step_end"] = _progress_callback(on_step, call.get("num_inference_steps") or 0)
    spaces = [space] + (["cross_attention"] if compare and space != "cross_attention" else [])
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with ConceptAttention(pipe, concepts, layers=layers, timesteps=timesteps, space=spaces,
                          max_sequence_length=call.get("max_sequence_length"), **options) as session:
        output = pipe(prompt=prompt, generator=generator, **call)
    maps = session.maps
    image = _attach_output(maps, output)
    maps.meta.update({
        "mode": "generate", "prompt": prompt, "seed": int(seed),
        "num_inference_steps": call.get("num_inference_steps") or None,
        **{key: call[key] for key in ("guidance_scale", "true_cfg_scale") if key in call},
        "image_size": [image.width, image.height],
        "model_id": getattr(pipe, "model_id", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None),
    })
    return maps


def _call_parameters(pipe: Any) -> Any:
    return inspect.signature(type(pipe).__call__).parameters


def pipeline_call(pipe: Any, steps: int | None, size: tuple[int, int] | None, num_frames: int | None
                  ) -> dict[str, Any]:
    """The keyword arguments of the pipeline call: checked user choices over the model's defaults."""
    defaults, parameters = pipeline_defaults(pipe), _call_parameters(pipe)
    call: dict[str, Any] = {}
    steps = defaults.get("num_inference_steps") if steps is None else steps
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        call["num_inference_steps"] = steps
    elif "num_inference_steps" in parameters:
        call["num_inference_steps"] = parameters["num_inference_steps"].default
    if num_frames is not None:
        call["num_frames"] = checked_num_frames(pipe, num_frames)
    if size is None and defaults.get("size") and {"width", "height"} <= set(parameters):
        size = (int(defaults["size"]), int(defaults["size"]))  # the model's own size, also for pipelines that
        # have no default_sample_size to set (e.g. CogView4, Z-Image)
    if size is not None:
        call["width"], call["height"] = checked_size(size, size_rule(pipe)[1])
        check_budget(pipe, call["width"], call["height"], frames=call.get("num_frames", 1))
    if "max_sequence_length" in defaults and "max_sequence_length" in parameters:
        call["max_sequence_length"] = int(defaults["max_sequence_length"])
    for key in ("guidance_scale", "true_cfg_scale", "negative_prompt"):
        if key in defaults and key in parameters:
            call[key] = defaults[key]
    return call


def _progress_callback(on_step: Callable[[int, int], None], total: int) -> Callable[..., dict]:
    def callback(pipeline: Any, index: int, timestep: Any, kwargs: dict) -> dict:
        on_step(index + 1, int(total))
        return kwargs

    return callback


def _attach_output(maps: ConceptMaps, output: Any) -> Any:
    """Put the generated image (or the first video's frames) on ``maps``; returns the (first) image."""
    video = getattr(output, "frames", None) if getattr(output, "images", None) is None else None
    if video is None:
        maps.image = to_rgb_image(output.images[0])
        return maps.image
    from .video import to_frames

    maps.frames = to_frames(video[0])
    maps.meta["num_frames"] = len(maps.frames)
    return maps.frames[0]


def check_timesteps(timesteps: Sequence[int] | None, steps: int | None) -> None:
    """Refuse step indices beyond the run's denoising steps (before any step runs)."""
    if timesteps is None or steps is None:
        return
    beyond = sorted(int(t) for t in ([timesteps] if isinstance(timesteps, int) else timesteps) if int(t) >= steps)
    if beyond:
        raise ValueError(f"timesteps {beyond} are beyond the {steps} denoising steps of this run "
                         f"(step indices 0-{steps - 1})")


def warn_if_truncated(pipe: Any, prompt: str, max_sequence_length: int | None) -> None:
    """One warning when a CLIP or T5 prompt encoder of ``pipe`` will cut the prompt (the most restrictive cut).

    CLIP encoders stop at their ``model_max_length``, T5 encoders at ``max_sequence_length`` (the
    pipeline's own default when None). Other encoders (chat templates) are not checked.
    """
    import warnings

    from .adapters.encoding import call_default

    cuts = []
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        kind = type(tokenizer).__name__
        if tokenizer is None or not ("CLIP" in kind or "T5" in kind):
            continue
        limit = int(tokenizer.model_max_length if "CLIP" in kind
                    else max_sequence_length or call_default(pipe, "max_sequence_length") or tokenizer.model_max_length)
        ids = tokenizer(prompt, truncation=False).input_ids
        if len(ids) > limit:
            cuts.append((limit, kind.replace("TokenizerFast", "").replace("Tokenizer", ""),
                         tokenizer.decode(ids[limit - 1:], skip_special_tokens=True)))
    if cuts:
        limit, kind, removed = min(cuts)
        warnings.warn(f"prompt cut to {limit} tokens by the model's {kind} encoder; it does not see: {removed!r}",
                      stacklevel=3)
