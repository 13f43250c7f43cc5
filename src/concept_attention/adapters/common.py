"""Steps several families share: size rules, timestep values, pooled-text modulation, flow-matching noise."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.contract import ExplainRequest, ModelAdapter, Recorder
from .wrapping import WrappingProcessor


def latent_size_rule(pipeline: Any, patch: int) -> tuple[int, int]:
    """``image_size_rule`` of a VAE-latent pipeline whose transformer patches ``patch`` × ``patch`` latents."""
    scale = int(getattr(pipeline, "vae_scale_factor", 8))
    native = int(getattr(pipeline, "default_sample_size", 128)) * scale
    return native, scale * patch


def timestep_value(timestep: Any, position: int = 0) -> float | None:
    """A transformer call's ``timestep`` argument as one float (``position`` in a tensor), or None."""
    if isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
        return float(timestep.flatten()[position])
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return None


def pooled_text_modulation(recorder: Recorder | None, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook on a ``time_text_embed(timestep, [guidance,] pooled)`` layer: the concept rows' ``temb``.

    ``concept_modulation="prompt"`` reuses the prompt's embedding; ``"zero"`` recomputes it with a
    zero pooled text vector (FLUX.1 and SD3 embed timestep and pooled text this way).
    """
    call = recorder.current_call if recorder is not None else None
    if call is None:
        return
    if recorder.concept_modulation == "prompt":
        call.modulation = output
    else:
        with torch.no_grad():
            call.modulation = module.forward(*args[:-1], torch.zeros_like(args[-1]))


def hook_time_embedding(adapter: ModelAdapter, module: nn.Module) -> None:
    """Install :func:`pooled_text_modulation` on ``module`` for ``adapter``'s recorder (undone on restore)."""
    handle = module.register_forward_hook(
        lambda mod, args, output: pooled_text_modulation(adapter.recorder, mod, args, output))
    adapter.on_undo(handle.remove)


def vae_latents(request: ExplainRequest, adapter: ModelAdapter) -> torch.Tensor:
    """VAE latents of the request's pixels with the VAE's shift and scaling, ``(1, C, h, w)``."""
    vae, transformer = request.pipeline.vae, adapter.transformer
    with torch.no_grad():
        encoded = vae.encode(request.pixels.to(device=transformer.device, dtype=vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((encoded - shift) * vae.config.scaling_factor).to(transformer.dtype)


def flow_noised(latents: torch.Tensor, request: ExplainRequest, adapter: ModelAdapter) -> torch.Tensor:
    """``(1 - t)·latents + t·noise`` for ``request.num_samples`` noise draws from the request's generator."""
    batch = latents.expand(request.num_samples, *latents.shape[1:])
    noise = adapter.draw_noise(batch.shape, request.generator)
    return (1.0 - request.timestep) * batch + request.timestep * noise


def full_timestep(request: ExplainRequest, adapter: ModelAdapter, scale: float = 1.0) -> torch.Tensor:
    """The request's noise level (times ``scale``) for every sample, on the model's device and dtype."""
    transformer = adapter.transformer
    return torch.full((request.num_samples,), float(request.timestep) * scale, device=transformer.device,
                      dtype=transformer.dtype)


def latents_and_image_ids(bound: Any, transformer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A FLUX-style call's ``hidden_states`` and one image's position ids ``img_ids`` ``(tokens, axes)``."""
    hidden, img_ids = bound.arguments.get("hidden_states"), bound.arguments.get("img_ids")
    if hidden is None or img_ids is None:
        raise ValueError(f"{type(transformer).__name__} was called without hidden_states or img_ids")
    return hidden, img_ids[0] if img_ids.dim() == 3 else img_ids


def grid_from_ids(ids: torch.Tensor) -> tuple[int, int]:
    """(height, width) of one image's position ids ``(tokens, [t, row, col, ...])``, which must fill the grid."""
    count = ids.shape[0]
    rows, cols = ids[:, 1].long(), ids[:, 2].long()
    height = int(rows.max() - rows.min()) + 1
    width = int(cols.max() - cols.min()) + 1
    if height * width != count:
        raise ValueError(f"cannot read an image grid from img_ids: {count} tokens, rows×cols = {height}×{width}")
    return height, width


def guidance_scale(call_arguments: Any, *names: str) -> float:
    """The first of ``names`` among a pipeline call's bound arguments, as a float (0 if none is there)."""
    for name in names:
        value = call_arguments.arguments.get(name)
        if value is not None:
            return float(value)
    return 0.0


def install_wrapped(adapter: ModelAdapter, recorder: Recorder, blocks: Sequence[int],
                    wrapping: tuple[str, tuple[type, ...], type[WrappingProcessor]],
                    hook: Callable[[nn.Module], Any]) -> None:
    """Attach ``recorder``, wrap each block's ``wrapping = (attention, known processors, wrapper class)`` and add
    ``hook(block)`` (a hook handle, removed on restore) to each block of ``blocks``."""
    attention, known, wrapper = wrapping
    adapter.attach(recorder)
    adapter.wrap_processors(blocks, attention, known,
                            lambda original, block, index: wrapper(original, block, index, recorder))
    for index in blocks:
        adapter.on_undo(hook(adapter.dual_blocks[index]).remove)
