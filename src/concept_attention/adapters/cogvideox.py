"""CogVideoX adapter (``CogVideoXTransformer3DModel``): concept maps over the frames of a video.

CogVideoX blocks have one set of weights for text and video: q/k/v, the qk LayerNorms, ``to_out``
and the feed-forward are shared; the streams differ only by the modulation (``CogVideoXLayerNormZero``
returns video and text (``enc_*``) shift/scale/gate from one Linear) and by RoPE (video only).
So the concept stream is: text modulation of ``norm1``/``norm2`` + the shared weights, no RoPE.
Concept queries attend to ``[video keys (rotated); concept keys]``.

Concepts are embedded with ``patch_embed.text_proj`` on their own: they are never appended to the
model input (the 2B model's joint position table fixes the text length at ``max_text_seq_length``).
The text rows of that table are zeros, so nothing is lost.

The joint order is ``[text, video]`` and a block returns ``(video, text)``. Maps live on the latent
token grid ``(frames, h, w)`` (``frames`` = latent frames, divided by ``patch_size_t`` for 1.5), so
``ConceptMaps.tensor`` is ``(batch, concepts, frames, h, w)``.

**Classifier-free guidance.** With ``guidance_scale > 1`` the pipeline runs one batched call
``[uncond, cond]``: while the session's pipeline runs, the layout is ``"batched"`` and maps are read
from the conditional half. A bare transformer called that way needs ``ConceptAttention(cfg="batched")``.

**Memory.** Only running sums of maps are kept; the video keys/values/outputs of a block are
referenced for the duration of that block's attention call and released right after.

**Real videos** (:func:`concept_attention.explain_video`): the frames are VAE-encoded as the
video-to-video pipeline does (latents ``(B, F, C, h, w)`` times ``vae.config.scaling_factor``) and
noised with the scheduler's own DDPM rule (``scheduler.add_noise``) at the training timestep of
noise level ``t`` (:func:`ddpm_timestep`). Text-to-video transformers only: image-to-video ones
take an extra image latent per frame and are refused.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import torch
from torch import nn

from ..core.contract import CallState, Recorder, VideoAdapter, register_adapter
from .common import guidance_scale, timestep_value
from .encoding import encode_with_t5, sequence_length
from .wrapping import Capture, Update, WrappingProcessor


COGVIDEOX_15_SHORT_SIDE = 768
COGVIDEOX_15_SIZE = (1360, 768)
"""CogVideoX 1.5 runs at 1360 × 768; its config's sample size (300 latents) is the extent of the RoPE table."""


def ddpm_timestep(scheduler: Any, timestep: float) -> int:
    """The training timestep of noise level ``timestep`` in (0, 1]: ``⌊t·(T − 1) + ½⌋``.

    With ``T = num_train_timesteps = 1000``: t = 1 → 999 (pure noise end), t = 0.5 → 500 (the
    paper's timestep).
    """
    last = int(scheduler.config.num_train_timesteps) - 1
    return int(math.floor(float(timestep) * last + 0.5))


def _known_processor_classes() -> tuple[type, ...]:
    from diffusers.models import attention_processor

    names = ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")
    return tuple(getattr(attention_processor, n) for n in names if hasattr(attention_processor, n))


class _VideoCapture(Capture):
    """The original processor's joint ``[text, video]`` keys (B, H, S, D after qk-norm), values and
    pre-projection outputs (B, S, inner); also the last key token before RoPE, to detect in-place RoPE."""

    def __init__(self) -> None:
        super().__init__()
        self.key_last: torch.Tensor | None = None

    def clear(self) -> None:
        super().clear()
        self.key_last = None

    def on_key(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.enabled:
            self.image_key = output
            self.key_last = output[:, :, -1:].clone()


class CogVideoXConceptProcessor(WrappingProcessor):
    """Wraps a block's original CogVideoX processor and runs the concept stream beside it."""

    family_label = "CogVideoX"
    captured_label = "keys/values/outputs"
    capture_class = _VideoCapture

    # diffusers filters attention kwargs by this signature: keep it identical to CogVideoXAttnProcessor2_0.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def hook(self, attn: nn.Module) -> None:
        key_module = attn.norm_k if attn.norm_k is not None else attn.to_k
        on_key = self.capture.on_key if attn.norm_k is not None else self._on_raw_key(attn)
        self._handles += [
            key_module.register_forward_hook(on_key),
            attn.to_v.register_forward_hook(self.capture.on_value),
            attn.to_out[0].register_forward_pre_hook(self.capture.on_output),
        ]

    def _on_raw_key(self, attn: nn.Module) -> Any:
        def on_key(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.capture.on_key(module, args, output.unflatten(-1, (attn.heads, -1)).transpose(1, 2))

        return on_key

    def _video_keys(self, key: torch.Tensor, text_len: int, rotary: Any) -> torch.Tensor:
        """Video keys after qk-norm and RoPE, (B, N, H, D), from the joint keys (B, H, S, D)."""
        capture = self.capture
        assert capture.key_last is not None
        video = key[:, :, text_len:]
        # diffusers rotates the video keys in place; rotate here only if that did not happen.
        if rotary is not None and torch.equal(key[:, :, -1:], capture.key_last):
            from diffusers.models.embeddings import apply_rotary_emb

            video = apply_rotary_emb(video, rotary)
        return video.transpose(1, 2)

    def _concept_step(self, attn: nn.Module, call: CallState, text_len: int, attention_mask: Any,
                      rotary: Any) -> Update:
        block, concepts, heads = self.block, call.concepts, attn.heads
        joint_key, joint_value, joint_output = self.captured()
        image_key = self._video_keys(joint_key, text_len, rotary)
        image_value = joint_value[:, text_len:].unflatten(-1, (heads, -1))
        image_output = joint_output[:, text_len:].unflatten(-1, (heads, -1))
        _, normed, _, gate_msa = block.norm1(concepts, concepts, call.modulation)
        query, key, value = (proj(normed).unflatten(-1, (heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        query = attn.norm_q(query) if attn.norm_q is not None else query
        key = attn.norm_k(key) if attn.norm_k is not None else key
        output = self.recorder.attend_and_record(self.slot, query, key, value, image_key, image_value,
                                                 image_output)
        attended = attn.to_out[1](attn.to_out[0](output.flatten(2).to(concepts.dtype)))
        return lambda: self._update(concepts, attended, gate_msa, call.modulation)

    def _update(self, concepts: torch.Tensor, attended: torch.Tensor, gate_msa: torch.Tensor,
                temb: torch.Tensor) -> torch.Tensor:
        """The residual update with the shared weights; ``norm2`` gives the text (``enc_*``) modulation and gate."""
        concepts = concepts + gate_msa * attended
        _, normed, _, gate_ff = self.block.norm2(concepts, concepts, temb)
        return concepts + gate_ff * self.block.ff(normed)


@register_adapter
class CogVideoXAdapter(VideoAdapter):
    """CogVideoX 2B / 5B / 1.5 (``CogVideoXTransformer3DModel``) text-to-video."""

    family = "cogvideox"
    transformer_class_names = ("CogVideoXTransformer3DModel",)

    default_concept_modulation = "prompt"
    """No pooled text vector exists: modulation depends on the timestep only, so both choices agree."""

    @property
    def concept_embed_dim(self) -> int:
        return int(self.transformer.config.text_embed_dim)

    # ------------------------------------------------------------------ concepts
    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        tokenizer = getattr(pipeline, "tokenizer", None)
        encoder = getattr(pipeline, "text_encoder", None)
        if tokenizer is None or encoder is None:
            raise TypeError(
                f"{type(pipeline).__name__} has no T5 prompt encoder (tokenizer/text_encoder); "
                "pass concept_embeds=[...] to encode concepts yourself"
            )
        return encode_with_t5(tokenizer, encoder, concepts, sequence_length(pipeline, max_sequence_length, 226))

    def embed_concepts(self, embeds: torch.Tensor) -> torch.Tensor:
        """``patch_embed.text_proj``, the projection the prompt goes through (module docstring)."""
        return self.transformer.patch_embed.text_proj(embeds)

    # ------------------------------------------------------------------ real videos
    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        """(native shorter side, multiple) in pixels: 480 (2B/5B: 60 × 90 latents) or 768 (1.5); VAE scale × patch.

        The config's sample size is the native size of 1.0 models and the RoPE table's extent for 1.5
        (whose native shorter side, 768 px, is capped to that extent).
        """
        config = self.transformer.config
        scale = int(pipeline.vae_scale_factor_spatial)
        native = min(int(config.sample_height), int(config.sample_width)) * scale
        if config.patch_size_t is not None:
            native = min(native, COGVIDEOX_15_SHORT_SIDE)
        return native, scale * int(config.patch_size)

    def native_frame_size(self, pipeline: Any) -> tuple[int, int]:
        """(width, height) in pixels the model was trained at: 720 × 480 (2B/5B), 1360 × 768 (1.5)."""
        config, scale = self.transformer.config, int(pipeline.vae_scale_factor_spatial)
        width, height = int(config.sample_width) * scale, int(config.sample_height) * scale
        if config.patch_size_t is not None:  # 1.5: the sample size is the RoPE table's extent
            width, height = min(width, COGVIDEOX_15_SIZE[0]), min(height, COGVIDEOX_15_SIZE[1])
        return width, height

    def frame_rule(self, pipeline: Any) -> tuple[int, int, int]:
        """(VAE temporal ratio, multiple the latent frame count must be, native number of pixel frames)."""
        config = self.transformer.config
        return int(pipeline.vae_scale_factor_temporal), int(config.patch_size_t or 1), int(config.sample_frames)

    def video_latents(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents ``(1, F, C, h, w)`` (the layout the transformer takes) of ``pixels`` (1, 3, F, H, W)."""
        vae, transformer = pipeline.vae, self.transformer
        if int(transformer.config.in_channels) != int(vae.config.latent_channels):
            raise TypeError(
                f"{type(pipeline).__name__} feeds the transformer {transformer.config.in_channels} channels per "
                f"frame, not the VAE's {vae.config.latent_channels} (an image-to-video or control model); "
                "explaining real videos needs a text-to-video CogVideoX model"
            )
        with torch.no_grad():
            encoded = vae.encode(pixels.to(device=transformer.device, dtype=vae.dtype)).latent_dist.mode()
        return (encoded.permute(0, 2, 1, 3, 4) * vae.config.scaling_factor).to(transformer.dtype)

    def video_inputs(
        self,
        pipeline: Any,
        latents: torch.Tensor,
        noise: torch.Tensor,
        prompt: str,
        timestep: float,
        max_sequence_length: int | None,
    ) -> dict[str, Any]:
        """Transformer keyword arguments: ``latents`` (1, F, C, h, w) noised by each row of ``noise``.

        The scheduler's ``add_noise`` at :func:`ddpm_timestep`; the prompt and RoPE as the pipeline builds them.
        """
        transformer = self.transformer
        device, dtype = transformer.device, transformer.dtype
        count = noise.shape[0]
        steps = torch.full((count,), ddpm_timestep(pipeline.scheduler, timestep), dtype=torch.long, device=device)
        clean = latents.float().expand(count, *latents.shape[1:])
        noised = pipeline.scheduler.add_noise(clean, noise.float(), steps).to(dtype)
        with torch.no_grad():
            prompt_embeds, _ = pipeline.encode_prompt(
                prompt=prompt, do_classifier_free_guidance=False, num_videos_per_prompt=count,
                max_sequence_length=self.text_length(max_sequence_length), device=device,
            )
        return {
            "hidden_states": noised,
            "encoder_hidden_states": prompt_embeds.to(dtype),
            "timestep": steps,
            "image_rotary_emb": self._rotary(pipeline, noised),
            "return_dict": False,
        }

    def text_length(self, max_sequence_length: int | None) -> int:
        """Prompt tokens: ``max_text_seq_length`` unless given; models with a joint position table need exactly that."""
        config = self.transformer.config
        native = int(config.max_text_seq_length)
        length = int(max_sequence_length or native)
        if length != native and not config.use_rotary_positional_embeddings:
            raise ValueError(
                f"this CogVideoX model's position table has {native} text rows: max_sequence_length must be "
                f"{native}, not {length}"
            )
        return length

    def _rotary(self, pipeline: Any, latents: torch.Tensor) -> Any:
        """The pipeline's RoPE tables for ``latents`` (B, F, C, h, w), or None for models without RoPE."""
        if not self.transformer.config.use_rotary_positional_embeddings:
            return None
        config = self.transformer.config
        scale = int(pipeline.vae_scale_factor_spatial)
        _, frames, _, height, width = latents.shape
        if config.patch_size_t is not None and (height > config.sample_height or width > config.sample_width):
            raise ValueError(
                f"{width * scale}x{height * scale} px is beyond this model's RoPE table (at most "
                f"{config.sample_width * scale}x{config.sample_height * scale} px): pass a smaller size"
            )
        return pipeline._prepare_rotary_positional_embeddings(height * scale, width * scale, frames, latents.device)

    # ------------------------------------------------------------------ calls
    def pipeline_cfg(self, pipeline: Any, call_arguments: inspect.BoundArguments) -> str:
        """CogVideoX pipelines batch ``[uncond, cond]`` when ``guidance_scale > 1``."""
        return "batched" if guidance_scale(call_arguments, "guidance_scale") > 1 else "none"

    def begin_call(self, bound: inspect.BoundArguments, call: CallState) -> None:
        hidden = bound.arguments.get("hidden_states")
        if hidden is None or hidden.dim() != 5:
            raise ValueError("CogVideoXTransformer3DModel was called without 5-D hidden_states (B, F, C, H, W)")
        config = self.transformer.config
        batch, frames, _, height, width = hidden.shape
        p, p_t = int(config.patch_size), config.patch_size_t
        call.batch_size = batch
        call.grid = (frames if p_t is None else math.ceil(frames / int(p_t)), height // p, width // p)
        call.num_map_tokens = call.grid[0] * call.grid[1] * call.grid[2]
        call.timestep = timestep_value(bound.arguments.get("timestep"), position=-1)

    def _on_block(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.current_call
        if call is not None:
            call.modulation = kwargs["temb"] if "temb" in kwargs else args[2]

    # ------------------------------------------------------------------ install
    def install(self, recorder: Recorder, blocks: Sequence[int]) -> None:
        self.attach(recorder)
        self.wrap_processors(
            blocks, "attn1", _known_processor_classes(),
            lambda original, block, index: CogVideoXConceptProcessor(original, block, index, recorder))
        for index in blocks:
            handle = self.dual_blocks[index].register_forward_pre_hook(self._on_block, with_kwargs=True)
            self.on_undo(handle.remove)
