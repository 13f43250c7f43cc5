"""CogView4 adapter (``CogView4Transformer2DModel``, ``CogView4Pipeline`` and its control variant).

CogView4 blocks are joint-attention blocks with **one set of projection weights for text and
image**: ``to_q/to_k/to_v``, the qk LayerNorms, ``to_out`` and the feed-forward ``ff`` are shared; the
streams differ only by modulation (``CogView4AdaLayerNormZero`` returns image and text (``c_*``)
shift/scale/gate from one Linear, with separate ``norm``/``norm_context``) and by RoPE (image
tokens only; text has no positions). So the concept stream is: ``norm1``'s *text* half
(``norm_context`` with ``c_shift/c_scale``, gate ``c_gate_msa``) + the shared q/k/v, qk-norm and
``to_out``, then ``norm2_context`` with the text MLP modulation + the shared ``ff`` (gate
``c_gate_mlp``); no RoPE. Concept queries attend to ``[image keys (rotated); concept keys]``. Every
block is joint, so every block can give a map; default: the deeper half.

**Modulation.** ``temb`` is the timestep plus the size conditions (original/target size, crop):
there is no pooled text vector, so ``concept_modulation="zero"`` and ``"prompt"`` coincide. The
concept rows use the ``temb`` the block receives (read by a pre-hook on ``norm1``).

**Concept rows.** A concept enters the stream as the prompt does, through ``patch_embed.text_proj``.
Concepts are encoded **one at a time** by the pipeline's ``encode_prompt``: the GLM encoder gets no
attention mask and the pipeline left-pads every prompt to a multiple of 16 tokens, so a concept's
vectors depend on its own padding and must be computed exactly as for a prompt of its own. A
concept's rows are its own tokens: those that differ from the empty prompt's (``[gMASK]<sop>``) and
are not padding, read from the token ids the encoder saw (pre-hook).

**Padding mask.** A text attention mask given to the transformer reaches only the wrapped processor;
concept queries attend to every image key and every concept key.

**CFG.** ``CogView4Pipeline`` calls the transformer twice per step inside ``cache_context("cond")`` /
``("uncond")``: layout ``"context"``.

**Fused QKV.** ``CogView4Transformer2DModel`` has no ``fuse_qkv_projections()``; fusing an
attention's projections by hand (``attn1.fuse_projections()``) leaves ``CogView4AttnProcessor`` on
the unfused ``to_q/to_k/to_v``, so outputs and maps are unchanged.

**Real images** (:func:`concept_attention.explain`): VAE latents times ``scaling_factor``, noised by
flow matching at ``t`` and run at timestep ``1000·t`` with original and target size = the picture's
size and crop ``(0, 0)``, as the pipeline conditions its own images.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import nn

from ..core.contract import CallState, ExplainRequest, ModelAdapter, Recorder, register_adapter
from .cogvideox import CogVideoXConceptProcessor
from .common import flow_noised, full_timestep, install_wrapped, timestep_value, vae_latents
from .encoding import own_rows, sequence_length
from .wrapping import Update, modulated, text_stream_update


def _known_processor_classes() -> tuple[type, ...]:
    from diffusers.models.transformers import transformer_cogview4

    names = ("CogView4AttnProcessor",)
    return tuple(getattr(transformer_cogview4, n) for n in names if hasattr(transformer_cogview4, n))


def shared_projections(attn: nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concept queries, keys (qk-normed) and values with the weights text and image share, (B, r, H, D)."""
    split = [proj(rows).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
    for position, norm in enumerate((attn.norm_q, attn.norm_k)):
        if norm is not None:
            split[position] = norm(split[position])
    return split[0], split[1], split[2]


class CogView4ConceptProcessor(CogVideoXConceptProcessor):
    """Wraps a block's original ``CogView4AttnProcessor`` (joint ``[text, image]`` attention, shared weights)."""

    family_label = "CogView4"

    def _video_keys(self, key: torch.Tensor, text_len: int, rotary: Any) -> torch.Tensor:
        """Image keys (B, N, H, D) after qk-norm and RoPE, from the joint keys (B, H, S, D).

        CogView4 rotates the image keys in place (halves convention, ``use_real_unbind_dim=-2``); they
        are rotated here only if that did not reach the captured tensor.
        """
        image = key[:, :, text_len:]
        in_place = rotary is None or not torch.equal(key[:, :, -1:], self.capture.key_last)
        if not in_place:
            from diffusers.models.embeddings import apply_rotary_emb

            image = apply_rotary_emb(image, rotary, use_real_unbind_dim=-2)
        return image.transpose(1, 2)

    def _concept_step(self, attn: nn.Module, call: CallState, text_len: int, attention_mask: Any,
                      rotary: Any) -> Update:
        block, concepts = self.block, call.concepts
        joint_key, joint_value, joint_output = self.captured()
        image = [self._video_keys(joint_key, text_len, rotary)]
        image += [t[:, text_len:].unflatten(-1, (attn.heads, -1)) for t in (joint_value, joint_output)]
        # norm1's text half (index 5 on): modulated rows and c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1.forward(concepts, concepts, call.modulation)[5:]
        query, key, value = shared_projections(attn, normed)
        output = self.recorder.attend_and_record(self.slot, query, key, value, *image)
        attended = attn.to_out[1](attn.to_out[0](output.flatten(2).to(concepts.dtype)))
        return lambda: text_stream_update(
            concepts, attended, gate_msa[:, None], modulated(block.norm2_context, shift_mlp[:, None],
                                                             scale_mlp[:, None]), gate_mlp[:, None], block.ff)


@register_adapter
class CogView4Adapter(ModelAdapter):
    """CogView4 (``CogView4Transformer2DModel``) text-to-image and control checkpoints."""

    family = "cogview4"
    transformer_class_names = ("CogView4Transformer2DModel",)

    default_concept_modulation = "prompt"  # no pooled text vector: "zero" and "prompt" coincide

    # ------------------------------------------------------------------ concepts
    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        length = sequence_length(pipeline, max_sequence_length, 1024)
        return own_rows(pipeline, concepts, "CogView4", 0, do_classifier_free_guidance=False,
                        max_sequence_length=length)[0]

    @property
    def concept_embed_dim(self) -> int:
        return int(self.transformer.config.text_embed_dim)

    def embed_concepts(self, embeds: torch.Tensor) -> torch.Tensor:
        """``patch_embed.text_proj``, the projection the prompt goes through."""
        return self.transformer.patch_embed.text_proj(embeds)

    # ------------------------------------------------------------------ real images
    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        """(native shorter side, multiple) in pixels: ``sample_size`` latents (unless the pipeline sets
        ``default_sample_size``) times the VAE scale; sides are multiples of VAE scale × patch size."""
        config = self.transformer.config
        scale = int(getattr(pipeline, "vae_scale_factor", 8))
        native = int(getattr(pipeline, "default_sample_size", None) or config.sample_size) * scale
        return native, scale * int(config.patch_size)

    def explain_inputs(self, request: ExplainRequest) -> dict[str, Any]:
        pipeline, transformer = request.pipeline, self.transformer
        noised = flow_noised(vae_latents(request, self), request, self)
        with torch.no_grad():
            prompt_embeds, _ = pipeline.encode_prompt(
                prompt=request.prompt, do_classifier_free_guidance=False, num_images_per_prompt=noised.shape[0],
                device=transformer.device,
                max_sequence_length=sequence_length(pipeline, request.max_sequence_length, 1024))
        height, width = request.pixels.shape[-2:]

        def condition(*values: float) -> torch.Tensor:
            return torch.tensor([values], dtype=transformer.dtype, device=transformer.device).repeat(noised.shape[0], 1)

        return {"hidden_states": noised, "encoder_hidden_states": prompt_embeds.to(transformer.dtype),
                "timestep": full_timestep(request, self, 1000.0), "original_size": condition(height, width),
                "target_size": condition(height, width), "crop_coords": condition(0, 0), "return_dict": False}

    # ------------------------------------------------------------------ calls
    def begin_call(self, bound: inspect.BoundArguments, call: CallState) -> None:
        hidden = bound.arguments.get("hidden_states")
        if hidden is None or hidden.dim() != 4:
            raise ValueError("CogView4Transformer2DModel was called without a (batch, channels, height, width) latent")
        batch, _, height, width = hidden.shape
        rows, cols = (side // int(self.transformer.config.patch_size) for side in (height, width))
        call.batch_size, call.grid, call.num_map_tokens = batch, (rows, cols), rows * cols
        timestep = timestep_value(bound.arguments.get("timestep"))
        call.timestep = None if timestep is None else timestep / 1000.0  # the noise level t (pipelines pass 1000·t)

    def _on_norm1(self, module: nn.Module, args: tuple) -> None:
        """The ``temb`` of the block's ``norm1(hidden_states, encoder_hidden_states, temb)`` call (positional)."""
        if self.current_call is not None and len(args) == 3:
            self.current_call.modulation = args[2]

    # ------------------------------------------------------------------ install
    def install(self, recorder: Recorder, blocks: Sequence[int]) -> None:
        install_wrapped(self, recorder, blocks, ("attn1", _known_processor_classes(), CogView4ConceptProcessor),
                        lambda block: block.norm1.register_forward_pre_hook(self._on_norm1))
