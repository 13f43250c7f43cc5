"""Qwen-Image adapter (``QwenImageTransformer2DModel``: Qwen-Image, its edit and img2img/inpaint pipelines).

Every Qwen-Image block is dual-stream, so every block can give a map. Per block the concept rows
are updated with the block's *text* weights: ``txt_norm1`` (LayerNorm) modulated by the block's
``txt_mod`` output (shift/scale/gate for attention and MLP, read from the block's own call),
``add_q/k/v_proj``, ``norm_added_q/k``, text RoPE, ``to_add_out``, the gates, ``txt_norm2`` and
``txt_mlp``. Concept queries attend to ``[image keys; concept keys]`` (no padding mask: the
prompt's ``encoder_hidden_states_mask`` reaches only the wrapped processor). Default maps: the
deeper half of the blocks.

**Concept rows.** A concept enters the text stream as the prompt does: ``txt_norm`` (RMSNorm),
then ``txt_in``. Concepts are encoded one at a time by the pipeline's own ``encode_prompt`` (system
template, last hidden layer, the first ``prompt_template_encode_start_idx`` rows dropped); a concept's
rows are its own tokens: those that differ from the empty prompt's (the template's prefix and
suffix, e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``, are removed). The token ids are read from the
text encoder's input with a pre-hook, so the pipeline's tokenisation is never re-implemented.

**Positions (RoPE).** Qwen-Image rotates text row ``i`` to position ``m + i`` on all three RoPE axes
(``m`` = the largest ``max(h // 2, w // 2)`` of the call's image shapes, as ``QwenEmbedRope`` computes
it). A concept row keeps the row index its token has when the concept is encoded alone (``0, 1, ...``
with Qwen's template: the concept *is* the prompt); concepts given as ``concept_embeds`` get
``0..n-1``. Concept RoPE comes from the model's own ``pos_embed`` for the call's ``img_shapes``.

**Modulation.** Qwen-Image has no pooled text vector: ``txt_mod`` depends on the timestep (and the
layered model's extra condition) only, so ``concept_modulation="zero"`` and ``"prompt"`` coincide.
With ``zero_cond_t`` (edit models) the text stream's rows come from the real timestep; the concept
rows use exactly what the text stream uses.

**CFG.** The pipelines call the transformer twice per step inside ``cache_context("cond")`` /
``("uncond")`` (true CFG with a negative prompt): layout ``"context"``.

**Reference images** (edit pipelines): the generated image's tokens come first in ``hidden_states``
and in ``img_shapes``; maps cover only them (the first shape), concepts attend to the reference
tokens too. Concepts are encoded as text alone (no reference image in the encoder's input).

**Not supported.** Layered decomposition (``use_layer3d_rope``) generates a stack of images (the
maps would need a layer axis) and is refused. Qwen-Image 2.1 (``QwenImage21Transformer2DModel``) is
not handled: it is single-stream with one set of weights for text and image *and* block-causal
attention, in which prompt tokens never attend to the target image. A concept stream that runs
like the prompt would never see the image, so ConceptAttention is not defined for it.

**Fused QKV.** ``fuse_qkv_projections()`` fuses only attention modules of the newer diffusers kind;
Qwen-Image's blocks keep ``QwenDoubleStreamAttnProcessor2_0`` on ``to_q/to_k/to_v``, so fusing
changes nothing here.

**Real images** (:func:`concept_attention.explain`): the Qwen VAE encodes the picture as one frame,
normalised by the VAE's ``latents_mean``/``latents_std`` as the pipelines do, noised by flow matching
at ``t`` (the transformer's timestep is ``t`` itself) and packed into 2×2 tokens.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import nn

from ..core.contract import CallState, ExplainRequest, ModelAdapter, Recorder, register_adapter
from .common import flow_noised, full_timestep, install_wrapped, latent_size_rule, timestep_value
from .encoding import own_rows, sequence_length
from .wrapping import Update, WrappingProcessor, modulated, text_stream_update


def _known_processor_classes() -> tuple[type, ...]:
    from diffusers.models.transformers import transformer_qwenimage

    names = ("QwenDoubleStreamAttnProcessor2_0",)
    return tuple(getattr(transformer_qwenimage, n) for n in names if hasattr(transformer_qwenimage, n))


def _rotated(rows: torch.Tensor, freqs: Any) -> torch.Tensor:
    """``rows`` (B, S, H, D) rotated by Qwen's complex RoPE ``freqs`` (S, D/2), as its processor rotates."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    return apply_rotary_emb_qwen(rows, freqs, use_real=False)


class QwenImageConceptProcessor(WrappingProcessor):
    """Wraps a block's original Qwen-Image processor and runs the concept stream beside it.

    Returns exactly what the original processor returns; all concept state lives on the session.
    """

    family_label = "Qwen-Image"

    # diffusers filters attention kwargs by this signature: keep it identical to QwenDoubleStreamAttnProcessor2_0.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None) -> Any:
        return self._run(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                         image_rotary_emb)

    def _concept_step(self, attn: nn.Module, call: CallState, text_len: int, text_mask: Any, attention_mask: Any,
                      rotary: Any) -> Update:
        block, concepts = self.block, call.concepts
        head_dim = attn.inner_dim // attn.heads
        (shift, scale, gate), (shift_mlp, scale_mlp, gate_mlp) = (
            part.unsqueeze(1).chunk(3, dim=-1) for part in call.modulation.chunk(2, dim=-1))
        normed = modulated(block.txt_norm1, shift, scale)(concepts)
        query, key = (self._normed(norm, proj(normed).unflatten(-1, (-1, head_dim)))
                      for proj, norm in ((attn.add_q_proj, attn.norm_added_q), (attn.add_k_proj, attn.norm_added_k)))
        value = attn.add_v_proj(normed).unflatten(-1, (-1, head_dim))
        image_key, image_value, image_output = self.captured()  # keys (B, N, H, D) before RoPE; the others flat
        image_value, image_output = (t.unflatten(-1, (-1, head_dim)) for t in (image_value, image_output))
        if rotary is not None:
            image_key = _rotated(image_key, rotary[0])
            query, key = _rotated(query, call.concept_rotary), _rotated(key, call.concept_rotary)
        output = self.recorder.attend_and_record(self.slot, query, key, value, image_key, image_value,
                                                 image_output)
        return lambda: text_stream_update(
            concepts, attn.to_add_out(output.flatten(2).to(concepts.dtype)), gate,
            modulated(block.txt_norm2, shift_mlp, scale_mlp), gate_mlp, block.txt_mlp)

    @staticmethod
    def _normed(norm: nn.Module | None, rows: torch.Tensor) -> torch.Tensor:
        return rows if norm is None else norm(rows)


@register_adapter
class QwenImageAdapter(ModelAdapter):
    """Qwen-Image (``QwenImageTransformer2DModel``) and its edit variants."""

    family = "qwenimage"
    transformer_class_names = ("QwenImageTransformer2DModel",)

    default_concept_modulation = "prompt"
    """No pooled text vector exists: modulation depends on the timestep only, so both choices agree."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__(transformer)
        self._encoded_positions: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ concepts
    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        offset = int(getattr(pipeline, "prompt_template_encode_start_idx", 0) or 0)  # template rows dropped
        length = sequence_length(pipeline, max_sequence_length, 512)
        embeds, self._encoded_positions = own_rows(pipeline, concepts, "Qwen-Image", offset, max_sequence_length=length)
        return embeds

    def embed_concepts(self, embeds: torch.Tensor) -> torch.Tensor:
        """``txt_in(txt_norm(·))``, the path the prompt takes into the text stream."""
        return self.transformer.txt_in(self.transformer.txt_norm(embeds))

    # ------------------------------------------------------------------ real images
    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        return latent_size_rule(pipeline, 2)  # 2×2 latent patches packed into one token

    def explain_inputs(self, request: ExplainRequest) -> dict[str, Any]:
        pipeline, transformer = request.pipeline, self.transformer
        noised = flow_noised(self._normalised_latents(request), request, self)
        batch, channels, _, height, width = noised.shape
        with torch.no_grad():
            prompt_embeds, mask = pipeline.encode_prompt(
                prompt=request.prompt, device=transformer.device, num_images_per_prompt=batch,
                max_sequence_length=sequence_length(pipeline, request.max_sequence_length, 512))
        return {"hidden_states": pipeline._pack_latents(noised, batch, channels, height, width),
                "encoder_hidden_states": prompt_embeds.to(transformer.dtype), "encoder_hidden_states_mask": mask,
                "timestep": full_timestep(request, self), "img_shapes": [[(1, height // 2, width // 2)]] * batch,
                "return_dict": False}

    def _normalised_latents(self, request: ExplainRequest) -> torch.Tensor:
        """The picture as one VAE frame ``(1, C, 1, h, w)``, normalised by the VAE's latent mean and std."""
        vae, transformer = request.pipeline.vae, self.transformer
        with torch.no_grad():
            pixels = request.pixels.to(device=transformer.device, dtype=vae.dtype)[:, :, None]
            encoded = vae.encode(pixels).latent_dist.mode()
        mean, std = (torch.tensor(values, dtype=encoded.dtype, device=encoded.device).view(1, -1, 1, 1, 1)
                     for values in (vae.config.latents_mean, vae.config.latents_std))
        return ((encoded - mean) / std).to(transformer.dtype)

    # ------------------------------------------------------------------ calls
    def begin_call(self, bound: inspect.BoundArguments, call: CallState) -> None:
        hidden, img_shapes = bound.arguments.get("hidden_states"), bound.arguments.get("img_shapes")
        if hidden is None or img_shapes is None:
            raise ValueError("QwenImageTransformer2DModel was called without hidden_states or img_shapes")
        frames, height, width = generated_shape(img_shapes)
        if frames != 1:
            raise ValueError(f"the generated image has {frames} frames in img_shapes; one is expected")
        call.batch_size = hidden.shape[0]
        call.grid = (int(height), int(width))
        call.num_map_tokens = int(height) * int(width)
        call.timestep = timestep_value(bound.arguments.get("timestep"))
        call.concept_rotary = self._concept_rotary(img_shapes, hidden.device)

    def _concept_rotary(self, img_shapes: Any, device: torch.device) -> torch.Tensor:
        """Text RoPE of every concept row at its position, from the model's ``pos_embed`` for ``img_shapes``."""
        assert self.recorder is not None
        sizes = [int(size) for size in self.recorder.concept_sizes]
        known = self._encoded_positions
        if known is not None and [int(p.numel()) for p in known] == sizes:
            positions = torch.cat(known).long()
        else:
            positions = torch.cat([torch.arange(size) for size in sizes])
        _, text_freqs = self.transformer.pos_embed(img_shapes, device=device, max_txt_seq_len=int(positions.max()) + 1)
        return text_freqs[positions.to(text_freqs.device)]

    def _on_text_modulation(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """The block's ``txt_mod`` output: the text stream's shift/scale/gate table, used for the concept rows."""
        call = self.current_call
        if call is not None:
            call.modulation = output

    # ------------------------------------------------------------------ install
    def install(self, recorder: Recorder, blocks: Sequence[int]) -> None:
        if getattr(self.transformer.config, "use_layer3d_rope", False):
            raise TypeError("layered Qwen-Image models (use_layer3d_rope) generate a stack of images; ConceptAttention "
                            "maps need one generated image per sample and are not supported for them")
        install_wrapped(self, recorder, blocks, ("attn", _known_processor_classes(), QwenImageConceptProcessor),
                        lambda block: block.txt_mod.register_forward_hook(self._on_text_modulation))


def generated_shape(img_shapes: Any) -> tuple[int, int, int]:
    """(frames, height, width) of the generated image: the first shape of the first sample, read as
    ``QwenEmbedRope`` reads ``img_shapes`` (a list per sample, or one shape per sample)."""
    per_sample = img_shapes[0] if isinstance(img_shapes, list) else img_shapes
    shapes = per_sample if isinstance(per_sample, list) else [per_sample]
    frames, height, width = shapes[0]
    return int(frames), int(height), int(width)
