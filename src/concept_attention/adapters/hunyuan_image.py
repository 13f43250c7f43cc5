"""HunyuanImage 2.1 adapter (``HunyuanImageTransformer2DModel``, ``HunyuanImagePipeline``).

The architecture is HunyuanVideo 1.0's on images, so the concept stream is the one of
:mod:`concept_attention.adapters.hunyuan_video`:

**Dual blocks.** Maps come from the 20 dual-stream ``transformer_blocks`` (the 40 single-stream
blocks share text and image weights: not used); default: the deeper half (10–19). Per dual block the
concept rows are updated with the block's *text* weights (``norm1_context`` AdaLN-Zero,
``add_q/k/v_proj``, ``norm_added_q/k``, ``to_add_out``, gates, ``norm2_context``, ``ff_context``);
concept queries attend to ``[image keys (after qk-norm and RoPE); concept keys]``.

**Positions.** RoPE covers the image tokens only (joint order ``[image, text]``): concepts get none.

**Token refiner.** Each concept's token rows go through ``context_embedder`` (the token refiner)
alone: self-attention over the concept's own rows, pooled vector = their mean, the call's timestep.

**Modulation.** The dual blocks' ``temb`` is the timestep embedding (plus the distilled-guidance and
MeanFlow ``timestep_r`` embeddings): no text enters it, so ``concept_modulation`` ``"zero"`` and
``"prompt"`` agree.

**Concepts** are encoded alone by the pipeline's ``encode_prompt`` (Qwen2.5-VL hidden states of the
prompt template, whose first ``drop_idx`` tokens are cropped); the concept's own tokens are found by
comparing with the empty prompt's template tokens. ByT5 glyph rows (quoted text in a prompt) are not
part of the concept encoding; they join the prompt stream only.

**Classifier-free guidance.** The pipeline's guider runs its batches under ``cache_context("pred_cond")``
and ``("pred_uncond")``: maps come from the conditional call. Guidance-distilled checkpoints run the
conditional call only.

**Real images** (:func:`concept_attention.explain`): VAE latents (``latent_dist.mode()`` times
``scaling_factor``) noised by flow matching at ``t`` (timestep ``1000·t``), the prompt as the pipeline
encodes it (with its glyph rows); distilled guidance at the pipeline's default scale; MeanFlow
checkpoints get ``timestep_r = timestep`` (one instantaneous step). ``HunyuanImageRefinerPipeline``
calls (5-D latents of one frame) are mapped on the image grid.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from ..core.contract import CallState, ExplainRequest, register_adapter
from .common import flow_noised, full_timestep, latent_size_rule, vae_latents
from .encoding import call_default
from .hunyuan_video import HunyuanConceptProcessor, TokenRefinedStream, template_concept_rows


class HunyuanImageConceptProcessor(HunyuanConceptProcessor):
    """The Hunyuan concept step, named for HunyuanImage in its messages."""

    family_label = "HunyuanImage"


@register_adapter
class HunyuanImageAdapter(TokenRefinedStream):
    """HunyuanImage 2.1 (base, distilled, MeanFlow) ``HunyuanImageTransformer2DModel`` checkpoints."""

    family = "hunyuanimage"
    transformer_class_names = ("HunyuanImageTransformer2DModel",)
    default_concept_modulation = "prompt"
    """No text enters the dual blocks' modulation, so both choices agree."""
    time_embedding = "time_guidance_embed"
    processor_class = HunyuanImageConceptProcessor
    processor_class_names = (("transformer_hunyuanimage", "HunyuanImageAttnProcessor"),)

    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        return template_concept_rows(pipeline, concepts, batch_size=len(concepts) + 1)

    def patch_sizes(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.transformer.config.patch_size)

    def begin_call(self, bound: inspect.BoundArguments, call: CallState) -> None:
        super().begin_call(bound, call)
        if len(call.grid) == 3 and call.grid[0] == 1:  # the refiner pipeline's single frame: an image grid
            call.grid = call.grid[1:]

    # ------------------------------------------------------------------ real images
    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        return latent_size_rule(pipeline, self.patch_sizes()[-1])

    def explain_inputs(self, request: ExplainRequest) -> dict[str, Any]:
        pipeline, transformer = request.pipeline, self.transformer
        noised = flow_noised(vae_latents(request, self), request, self)
        with torch.no_grad():
            embeds, mask, glyphs, glyphs_mask = pipeline.encode_prompt(
                prompt=request.prompt, device=transformer.device, batch_size=1,
                num_images_per_prompt=request.num_samples)
        timestep = full_timestep(request, self, 1000.0)
        inputs = {"hidden_states": noised, "timestep": timestep, "encoder_hidden_states": embeds.to(transformer.dtype),
                  "encoder_attention_mask": mask, "encoder_hidden_states_2": glyphs.to(transformer.dtype),
                  "encoder_attention_mask_2": glyphs_mask, "return_dict": False}
        if transformer.config.guidance_embeds:
            scale = float(call_default(pipeline, "distilled_guidance_scale") or 3.25)
            inputs["guidance"] = torch.full_like(timestep, 1000.0 * scale)
        if transformer.config.use_meanflow:
            inputs["timestep_r"] = timestep
        return inputs
