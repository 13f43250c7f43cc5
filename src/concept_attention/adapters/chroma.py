"""Chroma adapter (``ChromaTransformer2DModel``, ``ChromaPipeline``): a FLUX.1 architecture with
pruned modulation and a T5-only prompt encoder.

The dual blocks use FLUX's attention classes, so the FLUX concept processor (which wraps the
block's own processor: the image path is never re-implemented) runs the concept stream. What
differs from FLUX.1:

* **Modulation.** Chroma has no per-block modulation Linear: the model computes a table once per
  call (``distilled_guidance_layer``) and passes each dual block ``temb = cat(img_mod, txt_mod)``
  (6 + 6 rows). The concept rows use the block's *text* slice, read from the block's own
  ``norm1_context`` call. Chroma's table depends on the timestep only (no pooled text vector, the
  guidance input is fixed at 0), so ``concept_modulation="zero"`` and ``"prompt"`` coincide.
* **Padding mask.** The pipeline passes a T5 padding mask that each block expands to
  ``(B, 1, S, S)``; it reaches only the wrapped processor. Concept queries attend to
  ``[image keys; concept keys]`` without any mask.
* **Sequential CFG without ``cache_context``.** ``ChromaPipeline`` calls the transformer for the
  prompt first and then for the negative prompt at the same timestep. Inside a running pipeline
  the first call per timestep is the conditional one; direct transformer calls (a bare model,
  ``explain``) are all conditional.
* **Concepts** are encoded alone with the pipeline's ``encode_prompt`` (T5 with its attention
  mask, as Chroma encodes prompts); the rows of the concept's word pieces are kept (no ``</s>``
  or padding).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from .base import register_adapter, running_pipeline
from .encoding import select_rows, sequence_length, word_positions
from .flux import FluxAdapter

if TYPE_CHECKING:  # pragma: no cover
    from ..core.session import CallState, ConceptAttention


@register_adapter
class ChromaAdapter(FluxAdapter):
    """Chroma1 (HD, base, flash) ``ChromaTransformer2DModel`` checkpoints."""

    family = "chroma"
    transformer_class_names = ("ChromaTransformer2DModel",)

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__(transformer)
        self._previous_timestep: float | None = None

    # ------------------------------------------------------------------ concepts
    def encode_concepts(
        self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
    ) -> list[torch.Tensor]:
        tokenizer = getattr(pipeline, "tokenizer", None)
        encoder = getattr(pipeline, "text_encoder", None)
        if tokenizer is None or encoder is None or not hasattr(pipeline, "encode_prompt"):
            raise TypeError(
                f"{type(pipeline).__name__} has no T5 prompt encoder (tokenizer/text_encoder); pass "
                "concept_embeds=[...] to encode concepts yourself"
            )
        length = sequence_length(pipeline, max_sequence_length, 512)
        with torch.no_grad():
            embeds = pipeline.encode_prompt(
                prompt=list(concepts), device=pipeline._execution_device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=length,
            )[0]
        return select_rows(concepts, embeds, word_positions(tokenizer, concepts, length))

    # ------------------------------------------------------------------ real images
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
        length = sequence_length(pipeline, max_sequence_length, 512)
        with torch.no_grad():
            prompt_embeds, text_ids, mask = pipeline.encode_prompt(
                prompt=prompt, device=device, num_images_per_prompt=num_samples,
                do_classifier_free_guidance=False, max_sequence_length=length,
            )[:3]
        mask = pipeline._prepare_attention_mask(batch, packed.shape[1], dtype, mask)
        return {
            "hidden_states": packed,
            "encoder_hidden_states": prompt_embeds.to(dtype),
            "timestep": torch.full((batch,), float(timestep), device=device, dtype=dtype),
            "img_ids": image_ids,
            "txt_ids": text_ids,
            "attention_mask": mask,
            "return_dict": False,
        }

    # ------------------------------------------------------------------ calls
    def is_conditional_call(self, bound: inspect.BoundArguments, context_name: str | None) -> bool:
        if context_name is not None:
            return super().is_conditional_call(bound, context_name)
        pipeline = running_pipeline(self.transformer)
        if pipeline is None or not bool(getattr(pipeline, "do_classifier_free_guidance", False)):
            self._previous_timestep = None
            return True
        timestep = bound.arguments.get("timestep")
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else timestep
        first = value != self._previous_timestep  # cond first, then uncond at the same timestep
        self._previous_timestep = value
        return first

    def begin_call(self, bound: inspect.BoundArguments, call: "CallState") -> None:
        super().begin_call(bound, call)
        call.extras.pop("concept_temb", None)  # set per block from the block's text modulation

    def _on_time_embedding(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Chroma's time embedding is not a modulation vector; see :meth:`_on_text_modulation`."""

    def _on_text_modulation(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.current_call
        if call is not None:
            call.extras["concept_temb"] = kwargs["emb"] if "emb" in kwargs else args[-1]

    # ------------------------------------------------------------------ install
    def install(self, session: "ConceptAttention", blocks: Sequence[int]) -> None:
        self._previous_timestep = None
        super().install(session, blocks)
        for index in blocks:
            norm = self.dual_blocks[index].norm1_context
            handle = norm.register_forward_pre_hook(self._on_text_modulation, with_kwargs=True)
            self.on_undo(handle.remove)
