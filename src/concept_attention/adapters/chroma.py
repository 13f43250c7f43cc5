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
  prompt first and then for the negative prompt at the same timestep: while the session's
  ``ChromaPipeline`` runs with guidance (``guidance_scale > 1``), the layout is ``"sequential"``
  (the first call per timestep is the conditional one); other calls are all conditional.
* **Concepts** are encoded alone with the pipeline's ``encode_prompt`` (T5 with its attention
  mask, as Chroma encodes prompts); the rows of the concept's word pieces are kept (no ``</s>``
  or padding).
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import nn

from ..core.contract import ExplainRequest, Recorder, register_adapter
from .common import full_timestep, guidance_scale
from .encoding import select_rows, sequence_length, word_positions
from .flux import FluxAdapter, FluxConceptProcessor, _known_processor_classes


@register_adapter
class ChromaAdapter(FluxAdapter):
    """Chroma1 (HD, base, flash) ``ChromaTransformer2DModel`` checkpoints."""

    family = "chroma"
    transformer_class_names = ("ChromaTransformer2DModel",)

    def pipeline_cfg(self, pipeline: Any, call_arguments: inspect.BoundArguments) -> str:
        """``ChromaPipeline`` runs the prompt, then the negative prompt, at each timestep (no cache context)."""
        return "sequential" if guidance_scale(call_arguments, "guidance_scale") > 1 else "none"

    # ------------------------------------------------------------------ concepts
    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        tokenizer, encoder = getattr(pipeline, "tokenizer", None), getattr(pipeline, "text_encoder", None)
        if tokenizer is None or encoder is None or not hasattr(pipeline, "encode_prompt"):
            raise TypeError(f"{type(pipeline).__name__} has no T5 prompt encoder (tokenizer/text_encoder); pass "
                            "concept_embeds=[...] to encode concepts yourself")
        length = sequence_length(pipeline, max_sequence_length, 512)
        with torch.no_grad():
            embeds = pipeline.encode_prompt(prompt=list(concepts), device=pipeline._execution_device,
                                            num_images_per_prompt=1, do_classifier_free_guidance=False,
                                            max_sequence_length=length)[0]
        return select_rows(concepts, embeds, word_positions(tokenizer, concepts, length))

    # ------------------------------------------------------------------ real images
    def explain_inputs(self, request: ExplainRequest) -> dict[str, Any]:
        pipeline, transformer = request.pipeline, self.transformer
        packed, image_ids = self.packed_latents(request)
        with torch.no_grad():
            prompt_embeds, text_ids, mask = pipeline.encode_prompt(
                prompt=request.prompt, device=transformer.device, num_images_per_prompt=request.num_samples,
                do_classifier_free_guidance=False,
                max_sequence_length=sequence_length(pipeline, request.max_sequence_length, 512))[:3]
        mask = pipeline._prepare_attention_mask(packed.shape[0], packed.shape[1], transformer.dtype, mask)
        return {"hidden_states": packed, "encoder_hidden_states": prompt_embeds.to(transformer.dtype),
                "timestep": full_timestep(request, self), "img_ids": image_ids, "txt_ids": text_ids,
                "attention_mask": mask, "return_dict": False}

    def _on_text_modulation(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The block's text slice of Chroma's modulation table, as its ``norm1_context`` receives it."""
        call = self.current_call
        if call is not None:
            call.modulation = kwargs["emb"] if "emb" in kwargs else args[-1]

    # ------------------------------------------------------------------ install
    def install(self, recorder: Recorder, blocks: Sequence[int]) -> None:
        self.attach(recorder)
        self.wrap_processors(blocks, "attn", _known_processor_classes(),
                             lambda original, block, index: FluxConceptProcessor(original, block, index, recorder))
        for index in blocks:
            norm = self.dual_blocks[index].norm1_context
            handle = norm.register_forward_pre_hook(self._on_text_modulation, with_kwargs=True)
            self.on_undo(handle.remove)
