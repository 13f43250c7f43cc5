"""Z-Image adapter (``ZImageTransformer2DModel``, ``ZImagePipeline``; its img2img, inpaint and ControlNet pipelines
call the transformer the same way).

**Is a concept stream defined?** Z-Image is Lumina 2's design (:mod:`concept_attention.adapters.lumina2`):
its main ``layers`` run ``[image, caption]`` as one sequence with one set of weights *and* (in the text-to-
image mode) one modulation for every token. So a concept row is processed exactly as a caption row is,
only the attention pattern is the method's: concept queries see ``[image keys; concept keys]``, no image
or caption token sees a concept. Before the main layers the caption passes a text-only, unmodulated
``context_refiner``; the concepts pass it **each alone**. Maps come from the main ``layers`` (``dual_blocks``
here); default: the deeper half.

**Per layer** a concept row is ``attention_norm1``-ed times ``1 + scale_msa`` (the layer's
``adaLN_modulation`` of the timestep embedding), projected by the shared ``to_q/to_k/to_v``, qk-normed and
rotated at its caption position; then ``+ tanh(gate_msa) · attention_norm2(to_out(o_c))`` and ``+
tanh(gate_mlp) · ffn_norm2(ff(ffn_norm1(·) · (1 + scale_mlp)))``, as the layer updates every row.
The image part of the sequence is padded to a multiple of 32 tokens with the model's ``x_pad_token``;
prompt tokens attend to those rows, so concept queries do too (maps cover the real image tokens only).

**Modulation** is the timestep embedding only: ``concept_modulation`` ``"zero"`` and ``"prompt"`` coincide.

**Positions (RoPE).** Caption token ``i`` sits at ``(1 + i, 0, 0)`` (the image after the padded caption).
A concept row keeps the index its token has when the concept is encoded alone in the chat template;
concepts given as ``concept_embeds`` get ``0..n-1``.

**Concepts** are encoded one at a time by the pipeline's ``encode_prompt`` (Qwen3 chat template,
second-to-last hidden layer, padding dropped); a concept's rows are its own tokens, between the template's
common prefix and suffix with the empty prompt's, read from the token ids the encoder saw.

**CFG.** ``ZImagePipeline`` batches classifier-free guidance as ``[prompts; negative prompts]`` (conditional
rows *first*), which none of the library's CFG layouts describes (``"batched"`` maps the second half). So a
run with guidance (``guidance_scale > 0``) is refused with a clear error at its first transformer call;
Z-Image-Turbo's setting (``guidance_scale=0``) maps every call. With guidance, ``cfg="none"`` maps every
row and the first half of the batch are the conditional maps.

**Not supported.** The omni mode (``ZImageOmniPipeline``: nested lists of condition and target images,
SigLIP tokens, per-token clean/noisy modulation) is refused. ControlNet residuals are added to the prompt's
and image's rows by the model; concept rows get none.

**Fused QKV.** ``ZSingleStreamAttnProcessor`` always uses ``to_q/to_k/to_v``: fusing an attention by hand
leaves outputs and maps unchanged.

**Real images:** VAE latents (shift and scale) noised by flow matching at noise level ``t``; the
transformer's time runs the other way (``1 - t``), maps record ``t``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..core.contract import CallState, ExplainRequest, Recorder, register_adapter
from ..core.defaults import pipeline_defaults
from .common import flow_noised, full_timestep, guidance_scale, latent_size_rule, timestep_value, vae_latents
from .encoding import call_default, sequence_length
from .flux3 import WithoutText
from .lumina2 import SharedWeightsStream, image_rows, residual_update, shared_projections
from .wrapping import Update, WrappingProcessor

SEQUENCE_MULTIPLE = 32
"""Z-Image pads the image part (and the caption) of its sequence to a multiple of this many tokens."""


class ZImageConceptProcessor(WrappingProcessor):
    """Wraps a main layer's original ``ZSingleStreamAttnProcessor`` (self-attention over ``[image, caption]``).

    The attention gets no separate text argument; the shared wrapper is handed the sequence itself in its place
    (the concept step finds the image rows from the call's grid).
    """

    family_label = "Z-Image"

    def __init__(self, inner: Any, block: nn.Module, block_index: int, recorder: Recorder) -> None:
        super().__init__(WithoutText(inner, slot=True), block, block_index, recorder)

    # diffusers filters attention kwargs by this signature: keep it identical to ZSingleStreamAttnProcessor (which
    # computes keys and values from hidden_states alone and never reads encoder_hidden_states).
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> Any:
        return self._run(attn, hidden_states, hidden_states, attention_mask, freqs_cis)

    def _concept_step(self, attn: nn.Module, call: CallState, text_len: int, attention_mask: Any,
                      freqs: Any) -> Update:
        block, concepts = self.block, call.concepts
        scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(call.modulation).chunk(4, dim=1)
        normed = block.attention_norm1(concepts) * (1 + scale_msa[:, None])
        query, key, value = shared_projections(attn, normed, call.concept_rotary)
        count = call.num_map_tokens + (-call.num_map_tokens) % SEQUENCE_MULTIPLE  # the image rows, padding included
        image = image_rows(attn, self.captured(), freqs, [0] * concepts.shape[0], count)
        output = self.recorder.attend_and_record(self.slot, query, key, value, *image)
        return lambda: residual_update(
            concepts, attn.to_out[0](output.flatten(2).to(concepts.dtype)), (gate_msa, gate_mlp), scale_mlp,
            (block.attention_norm2, block.ffn_norm1, block.ffn_norm2), block.feed_forward)


@register_adapter
class ZImageAdapter(SharedWeightsStream):
    """Z-Image and Z-Image-Turbo (``ZImageTransformer2DModel``), text-to-image mode."""

    family = "zimage"
    transformer_class_names = ("ZImageTransformer2DModel",)
    attention = "attention"
    processor_class = ZImageConceptProcessor
    processor_names = ("transformer_z_image", "ZSingleStreamAttnProcessor")
    default_sequence_length = 512

    def embed_concepts(self, embeds: torch.Tensor) -> torch.Tensor:
        """``cap_embedder`` (RMSNorm, Linear), the path the caption takes in."""
        return self.transformer.cap_embedder(embeds)

    def time_embedding(self) -> nn.Module:
        return self.transformer.t_embedder

    def pipeline_cfg(self, pipeline: Any, call_arguments: inspect.BoundArguments) -> str:
        """Without guidance every call is the prompt's; with it the batch is ``[prompts; negative prompts]``."""
        if guidance_scale(call_arguments, "guidance_scale") > 0:
            raise ValueError(
                f"{type(pipeline).__name__} runs classifier-free guidance as one batch with the prompts' rows first, "
                "which ConceptAttention cannot tell apart yet: run it with guidance_scale=0 (Z-Image-Turbo's setting), "
                "or with ConceptAttention(..., cfg='none') and read the first half of the maps' batch")
        return "none"

    # ------------------------------------------------------------------ calls
    def bind_call(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        """The call's arguments by name; Z-Image names its latents ``x`` (a list), the session reads
        ``hidden_states`` (for the dtype and device of the concept rows): the first latent is given that name."""
        bound = super().bind_call(args, kwargs)
        latents = bound.arguments.get("x")
        if isinstance(latents, (list, tuple)) and latents and isinstance(latents[0], torch.Tensor):
            bound.arguments["hidden_states"] = latents[0]
        return bound

    def begin_call(self, bound: inspect.BoundArguments, call: CallState) -> None:
        latents = bound.arguments.get("x")
        if not isinstance(latents, (list, tuple)) or not latents or not isinstance(latents[0], torch.Tensor):
            raise ValueError("ZImageTransformer2DModel was called in omni mode (nested lists of images) or without "
                             "latents; ConceptAttention supports its text-to-image mode only")
        defaults = bound.signature.parameters
        patch = int(bound.arguments.get("patch_size", defaults["patch_size"].default))
        frames = int(bound.arguments.get("f_patch_size", defaults["f_patch_size"].default))
        shapes = {tuple(latent.shape[1:]) for latent in latents}
        (frame_count, height, width), = shapes if len(shapes) == 1 else ((0, 0, 0),)
        if frame_count // frames != 1:
            raise ValueError(f"ConceptAttention maps one image per sample; got latents of shapes {sorted(shapes)}")
        rows, cols = height // patch, width // patch
        call.batch_size, call.grid, call.num_map_tokens = len(latents), (rows, cols), rows * cols
        timestep = timestep_value(bound.arguments.get("t"))
        call.timestep = None if timestep is None else 1.0 - timestep  # Z-Image's time runs from noise (0) to image
        positions = self.concept_positions().to(latents[0].device)
        ids = torch.zeros(positions.numel(), 3, dtype=torch.int32, device=positions.device)
        ids[:, 0] = 1 + positions.to(torch.int32)
        call.concept_rotary = self.transformer.rope_embedder(ids)[None]  # (1, rows, head_dim / 2)

    # ------------------------------------------------------------------ real images
    def explain_inputs(self, request: ExplainRequest) -> dict[str, Any]:
        pipeline, transformer = request.pipeline, self.transformer
        noised = flow_noised(vae_latents(request, self), request, self)
        with torch.no_grad():
            (caption,), _ = pipeline.encode_prompt(
                request.prompt, device=transformer.device, do_classifier_free_guidance=False,
                max_sequence_length=sequence_length(pipeline, request.max_sequence_length, 512))
        return {"x": list(noised.unsqueeze(2).unbind(0)), "t": 1.0 - full_timestep(request, self),
                "cap_feats": [caption.to(transformer.dtype)] * noised.shape[0], "return_dict": False}

    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        """(native shorter side: ``concept_attention.json``'s ``size``, else the pipeline's default 1024 px; VAE scale
        × patch) in pixels (``ZImagePipeline`` has no ``default_sample_size`` to carry the size)."""
        multiple = latent_size_rule(pipeline, int(self.transformer.config.all_patch_size[0]))[1]
        return int(pipeline_defaults(pipeline).get("size") or call_default(pipeline, "height") or 1024), multiple
