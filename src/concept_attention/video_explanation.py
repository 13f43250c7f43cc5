"""Explain a real video: where does a video model (CogVideoX) see each concept, frame by frame?

Like :func:`concept_attention.explain` for images: the video is VAE-encoded, noised to one noise
level, and the transformer runs once (early exit after the last selected block) with the prompt
(empty by default) and the concepts; the maps of ``num_samples`` noise draws are averaged.

Frame policy: CogVideoX's causal VAE takes ``4k + 1`` frames (frame 0 alone, then groups of 4,
one latent frame each); CogVideoX 1.5 also patches latent frames in pairs, so their number must be
even. The explained frames are the **first** ``num_frames`` frames of the video, consecutive and
unresampled; by default the most the model accepts up to its native length (CogVideoX 2B/5B: 49,
1.5: 77). At least two latent frames are needed (5 frames). To cover a longer clip, subsample it
first, e.g. ``frames[::3]``.

Size policy: as for images, the shorter side is scaled to the model's native size (CogVideoX
2B/5B: 480 px, 1.5: 768 px) keeping the aspect ratio, both sides rounded to the VAE scale × patch
size (16 px).

Noise: the latents are noised by the scheduler's own rule (``scheduler.add_noise``, DDPM
``√ᾱ·x₀ + √(1−ᾱ)·ε``) at the training timestep ``⌊t·(T − 1) + ½⌋`` of the noise level ``t`` in
(0, 1] (t = 0.5 → 500, the paper's choice). All draws are made at once as float32 standard normal
noise of shape ``(num_samples, F, C, h, w)`` from ``torch.Generator().manual_seed(seed)``, so
``batch_samples=False`` (one sample per forward) sees the same noise as the batched default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .core.maps import ConceptMaps
from .core.session import ConceptAttention
from .explanation import run_to_last_layer
from .options import adapter_of, check_budget, check_num_frames, check_request, fewest_frames, frame_count, \
    run_size
from .video import load_video, video_fps


def explain_video(pipe: Any, video: Any, concepts: Sequence[str], prompt: str = "", timestep: float | None = None,
                  num_samples: int = 2, seed: int = 0, layers: Sequence[int] | None = None, *,
                  size: tuple[int, int] | None = None, num_frames: int | None = None,
                  space: str | Sequence[str] = "output", batch_samples: bool = True,
                  max_sequence_length: int | None = None, **options: Any) -> ConceptMaps:
    """ConceptAttention maps of ``concepts`` on a real video, one map per latent frame.

    Args:
        pipe: a text-to-video CogVideoX pipeline (``CogVideoXPipeline``, ``CogVideoXVideoToVideoPipeline``).
        video: a video file (MP4, GIF, WebM, ...), a list of PIL images, a ``(F, H, W, 3)`` array or
            a ``(F, 3, H, W)`` / ``(F, H, W, 3)`` tensor.
        concepts: the words to locate, e.g. ``["dog", "grass", "sky"]``.
        prompt: text the transformer sees with the video (empty by default).
        timestep: noise level t in (0, 1] (default: the pipeline's, else 0.5); see the module docstring.
        num_samples: noise draws averaged (videos are costly: 2 by default, images 4).
        seed: seed of the noise draws.
        layers: blocks to average (default: the deeper half).
        size: (width, height) to run at instead of the size policy.
        num_frames: leading frames to explain (a count the model accepts); default: the module's policy.
        space: as in :class:`ConceptAttention`; several spaces are returned in ``maps.others``.
        batch_samples: all noise samples in one forward (else one forward per sample, same noise).
        options: further :class:`ConceptAttention` options (``softmax``, ablations, ...).

    Returns:
        :class:`ConceptMaps` of shape ``(1, concepts, latent frames, h, w)`` with ``maps.frames`` the
        explained source frames (``maps.save`` writes one heat-map video per concept and a contact
        sheet) and ``maps.meta`` recording frames, sizes, prompt, timestep (also the model's), samples and seed.
    """
    timestep = check_request(pipe, prompt, timestep, num_samples)
    frames = leading_frames(pipe, video, num_frames)
    session = ConceptAttention(pipe, concepts, layers=layers, space=space, max_sequence_length=max_sequence_length,
                               **options)
    adapter = session.adapter
    width, height = run_size(frames[0].width, frames[0].height, size, adapter.image_size_rule(pipe))
    check_budget(pipe, width, height, frames=len(frames), batch=num_samples if batch_samples else 1)
    latents = adapter.video_latents(pipe, pipe.video_processor.preprocess_video(frames, height=height, width=width))
    noise = adapter.draw_noise((num_samples, *latents.shape[1:]), torch.Generator().manual_seed(int(seed)))
    batches = (adapter.video_inputs(pipe, latents, part, prompt, timestep, session.max_sequence_length)
               for part in noise.split(num_samples if batch_samples else 1))
    maps = run_to_last_layer(session, batches)
    maps.meta.update({
        "mode": "explain_video", "prompt": prompt, "timestep": timestep, "num_samples": num_samples, "seed": int(seed),
        "model_timestep": maps.timesteps[0] if maps.timesteps else None, "num_frames": len(frames),
        "latent_frames": int(latents.shape[1]), "original_size": [frames[0].width, frames[0].height],
        "model_size": [width, height], **({"fps": video_fps(video)} if isinstance(video, (str, Path)) else {})})
    maps.frames = frames
    return maps


def leading_frames(pipe: Any, video: Any, num_frames: int | None) -> list:
    """The video's first frames the model takes (``num_frames`` if given; module docstring), checked first."""
    ratio, multiple, native = adapter_of(pipe, video=True).frame_rule(pipe)
    if num_frames is not None:
        check_num_frames(num_frames, ratio, multiple)
    frames = load_video(video, max_frames=num_frames or max(native, fewest_frames(ratio, multiple)))
    return frames[: frame_count(len(frames), ratio, multiple, num_frames)]
