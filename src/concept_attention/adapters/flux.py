"""FLUX.1 adapter (``FluxTransformer2DModel``): dual-stream blocks, T5 concepts, zero text RoPE.

Per dual block the concept rows are updated with the block's *text* weights: ``norm1_context``
(AdaLN-Zero modulation), ``add_q/k/v_proj``, ``norm_added_q/k``, ``to_add_out``, the gates,
``norm2_context`` and ``ff_context``. Concept queries attend to ``[image keys; concept keys]``.
Text positions in FLUX.1 are all zero, so text RoPE is the identity and concepts get none.
Modulation: ``time_text_embed`` with a zero pooled vector (``"zero"``, the authors' choice) or the
prompt's (``"prompt"``). CFG: ``FluxPipeline`` names its calls with ``cache_context("cond"/"uncond")``.

The image path is never re-implemented: the concept processor calls the block's original
processor and reads what it needs (image keys after qk-norm, image values, the image attention
output before ``to_out``) through forward hooks on the attention's own sub-modules.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import nn

from ..core.contract import CallState, ExplainRequest, ModelAdapter, Recorder, register_adapter
from .common import flow_noised, full_timestep, grid_from_ids, hook_time_embedding, latent_size_rule, \
    latents_and_image_ids, timestep_value, vae_latents
from .encoding import encode_with_t5, sequence_length
from .wrapping import FluxStyleProcessor, Update, modulated, text_stream_update


def _known_processor_classes() -> tuple[type, ...]:
    from diffusers.models.transformers import transformer_flux

    names = ("FluxAttnProcessor", "FluxAttnProcessor2_0")
    return tuple(getattr(transformer_flux, n) for n in names if hasattr(transformer_flux, n))


class FluxConceptProcessor(FluxStyleProcessor):
    """Wraps a block's original Flux attention processor and runs the concept stream beside it.

    Returns exactly what the original processor returns; all concept state lives on the session.
    """

    # diffusers filters attention kwargs by this signature: keep it identical to FluxAttnProcessor.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def _concept_step(self, attn: nn.Module, call: CallState, text_len: int, attention_mask: Any,
                      rotary: Any) -> Update:
        block, concepts = self.block, call.concepts
        image_key, image_value, image_output = self.image_activations(attn, text_len, rotary)
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(concepts, emb=call.modulation)
        query, key, value = self.text_projections(attn, normed)
        output = self.recorder.attend_and_record(self.slot, query, key, value, image_key, image_value,
                                                 image_output)
        return lambda: text_stream_update(
            concepts, attn.to_add_out(output.flatten(2).to(concepts.dtype)), gate_msa.unsqueeze(1),
            modulated(block.norm2_context, shift_mlp[:, None], scale_mlp[:, None]), gate_mlp.unsqueeze(1),
            block.ff_context)


@register_adapter
class FluxAdapter(ModelAdapter):
    """FLUX.1 dev / schnell / Kontext and other ``FluxTransformer2DModel`` checkpoints."""

    family = "flux"
    transformer_class_names = ("FluxTransformer2DModel",)

    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        tokenizer, encoder = getattr(pipeline, "tokenizer_2", None), getattr(pipeline, "text_encoder_2", None)
        if tokenizer is None or encoder is None:
            raise TypeError(f"{type(pipeline).__name__} has no T5 prompt encoder (tokenizer_2/text_encoder_2); "
                            "pass concept_embeds=[...] to encode concepts yourself")
        return encode_with_t5(tokenizer, encoder, concepts, sequence_length(pipeline, max_sequence_length, 512))

    # ------------------------------------------------------------------ real images
    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        return latent_size_rule(pipeline, 2)  # 2×2 latent patches packed into one token

    def explain_inputs(self, request: ExplainRequest) -> dict[str, Any]:
        pipeline, transformer = request.pipeline, self.transformer
        packed, image_ids = self.packed_latents(request)
        with torch.no_grad():
            prompt_embeds, pooled, text_ids = pipeline.encode_prompt(
                prompt=request.prompt, prompt_2=None, device=transformer.device,
                num_images_per_prompt=request.num_samples,
                max_sequence_length=sequence_length(pipeline, request.max_sequence_length, 512))
        inputs = {"hidden_states": packed, "encoder_hidden_states": prompt_embeds.to(transformer.dtype),
                  "pooled_projections": pooled.to(transformer.dtype), "timestep": full_timestep(request, self),
                  "img_ids": image_ids, "txt_ids": text_ids, "return_dict": False}
        if transformer.config.guidance_embeds:
            inputs["guidance"] = torch.full((request.num_samples,), 3.5, device=transformer.device,
                                            dtype=torch.float32)
        return inputs

    def packed_latents(self, request: ExplainRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """Noised latents of the request's pixels packed into 2×2 tokens, and their ``img_ids``."""
        noised = flow_noised(vae_latents(request, self), request, self)
        batch, channels, height, width = noised.shape
        packed = request.pipeline._pack_latents(noised, batch, channels, height, width)
        image_ids = request.pipeline._prepare_latent_image_ids(batch, height // 2, width // 2, self.transformer.device,
                                                               self.transformer.dtype)
        return packed, image_ids

    # ------------------------------------------------------------------ calls
    def begin_call(self, bound: inspect.BoundArguments, call: CallState) -> None:
        hidden, ids = latents_and_image_ids(bound, self.transformer)
        count = generated_token_count(ids)
        call.batch_size = hidden.shape[0]
        call.grid = grid_from_ids(ids[:count])
        call.num_map_tokens = count
        call.timestep = timestep_value(bound.arguments.get("timestep"))

    # ------------------------------------------------------------------ install
    def install(self, recorder: Recorder, blocks: Sequence[int]) -> None:
        self.attach(recorder)
        self.wrap_processors(blocks, "attn", _known_processor_classes(),
                             lambda original, block, index: FluxConceptProcessor(original, block, index, recorder))
        hook_time_embedding(self, self.transformer.time_text_embed)


def generated_token_count(ids: torch.Tensor) -> int:
    """How many leading image tokens belong to the generated image (Kontext appends reference tokens with
    another first id)."""
    generated = ids[:, 0] == ids[0, 0]
    return int(generated.sum()) if bool(generated.all()) else int(generated.int().argmin())
