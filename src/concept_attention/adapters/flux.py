"""FLUX.1 adapter (``FluxTransformer2DModel``): dual-stream blocks, T5 concepts, zero text RoPE.

Per dual block the concept rows are updated with the block's *text* weights: ``norm1_context``
(AdaLN-Zero modulation), ``add_q/k/v_proj``, ``norm_added_q/k``, ``to_add_out``, the gates,
``norm2_context`` and ``ff_context``. Concept queries attend to ``[image keys; concept keys]``.
Text positions in FLUX.1 are all zero, so text RoPE is the identity and concepts get none.

The image path is never re-implemented: the concept processor calls the block's original
processor and reads what it needs (image keys after qk-norm, image values, the image attention
output before ``to_out``) through forward hooks on the attention's own sub-modules.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from .base import ModelAdapter, latent_size_rule, pooled_text_modulation, register_adapter, timestep_value
from .encoding import encode_with_t5, sequence_length
from .wrapping import FluxStyleProcessor

if TYPE_CHECKING:  # pragma: no cover
    from ..core.session import CallState, ConceptAttention


def _known_processor_classes() -> tuple[type, ...]:
    from diffusers.models.transformers import transformer_flux

    names = ("FluxAttnProcessor", "FluxAttnProcessor2_0")
    return tuple(getattr(transformer_flux, n) for n in names if hasattr(transformer_flux, n))


class FluxConceptProcessor(FluxStyleProcessor):
    """Wraps a block's original Flux attention processor and runs the concept stream beside it.

    Returns exactly what the original processor returns; all concept state lives on the session.
    """

    # diffusers filters attention kwargs by this signature: keep it identical to FluxAttnProcessor.
    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def _concept_step(self, attn: nn.Module, call: "CallState", text_len: int, attention_mask: Any,
                      rotary: Any) -> None:
        block, session = self.block, self.session
        image_key, image_value, image_output = self.image_activations(attn, text_len, rotary)

        concepts = call.concepts
        temb = call.extras["concept_temb"]
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(concepts, emb=temb)
        query, key, value = self.text_projections(attn, normed)
        concept_output = session.attend_and_record(
            self.block_index, query, key, value, image_key, image_value, image_output
        )
        if self.block_index >= session.last_layer:
            return  # no later block reads the concept rows: skip their update
        # Residual update of the concept rows with the block's text-stream weights.
        attended = attn.to_add_out(concept_output.flatten(2).to(concepts.dtype))
        concepts = concepts + gate_msa.unsqueeze(1) * attended
        normed = block.norm2_context(concepts) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        concepts = concepts + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        if concepts.dtype == torch.float16:
            concepts = concepts.clip(-65504, 65504)
        call.concepts = concepts


@register_adapter
class FluxAdapter(ModelAdapter):
    """FLUX.1 dev / schnell / Kontext and other ``FluxTransformer2DModel`` checkpoints."""

    family = "flux"
    transformer_class_names = ("FluxTransformer2DModel",)

    @property
    def dual_blocks(self) -> Sequence[nn.Module]:
        return self.transformer.transformer_blocks

    @property
    def concept_embed_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    # ------------------------------------------------------------------ concepts
    def encode_concepts(
        self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
    ) -> list[torch.Tensor]:
        tokenizer = getattr(pipeline, "tokenizer_2", None)
        encoder = getattr(pipeline, "text_encoder_2", None)
        if tokenizer is None or encoder is None:
            raise TypeError(
                f"{type(pipeline).__name__} has no T5 prompt encoder (tokenizer_2/text_encoder_2); "
                "pass concept_embeds=[...] to encode concepts yourself"
            )
        return encode_with_t5(tokenizer, encoder, concepts, sequence_length(pipeline, max_sequence_length, 512))

    # ------------------------------------------------------------------ real images
    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        return latent_size_rule(pipeline, 2)  # 2×2 latent patches packed into one token

    def explain_inputs(
        self,
        pipeline: Any,
        pixels: torch.Tensor,
        prompt: str,
        timestep: float,
        noise: torch.Tensor | None,
        num_samples: int,
        generator: torch.Generator,
        max_sequence_length: int | None,
    ) -> dict[str, Any]:
        transformer = self.transformer
        device, dtype = transformer.device, transformer.dtype
        packed, image_ids = self.packed_latents(pipeline, pixels, timestep, noise, num_samples, generator)
        batch = packed.shape[0]
        with torch.no_grad():
            prompt_embeds, pooled, text_ids = pipeline.encode_prompt(
                prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=num_samples,
                max_sequence_length=sequence_length(pipeline, max_sequence_length, 512),
            )
        inputs = {
            "hidden_states": packed,
            "encoder_hidden_states": prompt_embeds.to(dtype),
            "pooled_projections": pooled.to(dtype),
            "timestep": torch.full((batch,), float(timestep), device=device, dtype=dtype),
            "img_ids": image_ids,
            "txt_ids": text_ids,
            "return_dict": False,
        }
        if transformer.config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)
        return inputs

    def packed_latents(
        self,
        pipeline: Any,
        pixels: torch.Tensor,
        timestep: float,
        noise: torch.Tensor | None,
        num_samples: int,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noised latents of ``pixels`` packed into 2×2 tokens, and their ``img_ids``."""
        noised = self.noised_latents(pipeline, pixels, timestep, noise, num_samples, generator)
        batch, channels, height, width = noised.shape
        packed = pipeline._pack_latents(noised, batch, channels, height, width)
        device, dtype = self.transformer.device, self.transformer.dtype
        return packed, pipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)

    # ------------------------------------------------------------------ calls
    def begin_call(self, bound: inspect.BoundArguments, call: "CallState") -> None:
        arguments = bound.arguments
        hidden = arguments.get("hidden_states")
        img_ids = arguments.get("img_ids")
        if hidden is None or img_ids is None:
            raise ValueError("FluxTransformer2DModel was called without hidden_states or img_ids")
        ids = img_ids[0] if img_ids.dim() == 3 else img_ids
        generated = ids[:, 0] == ids[0, 0]
        count = int(generated.sum()) if bool(generated.all()) else int(generated.int().argmin())
        call.batch_size = hidden.shape[0]
        call.grid = grid_from_ids(ids[:count])
        call.num_map_tokens = count
        call.timestep = timestep_value(arguments.get("timestep"))
        call.concepts = self.concept_rows(hidden.dtype, hidden.device).unsqueeze(0).expand(call.batch_size, -1, -1)

    def _on_time_embedding(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        pooled_text_modulation(self._session, module, args, output)

    # ------------------------------------------------------------------ install
    def install(self, session: "ConceptAttention", blocks: Sequence[int]) -> None:
        self.attach(session)
        self.wrap_processors(
            blocks, "attn", _known_processor_classes(),
            lambda original, block, index: FluxConceptProcessor(original, block, index, session),
        )
        handle = self.transformer.time_text_embed.register_forward_hook(self._on_time_embedding)
        self.on_undo(handle.remove)


def grid_from_ids(ids: torch.Tensor) -> tuple[int, int]:
    """(height, width) of one image's position ids ``(tokens, [t, row, col, ...])``, which must fill the grid."""
    count = ids.shape[0]
    rows = ids[:, 1].long()
    cols = ids[:, 2].long()
    height = int(rows.max() - rows.min()) + 1
    width = int(cols.max() - cols.min()) + 1
    if height * width != count:
        raise ValueError(f"cannot read an image grid from img_ids: {count} tokens, rows×cols = {height}×{width}")
    return height, width
