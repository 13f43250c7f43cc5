"""HunyuanVideo adapters: HunyuanVideo 1.0 (``HunyuanVideoTransformer3DModel``, ``HunyuanVideoPipeline``) and
HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``, ``HunyuanVideo15Pipeline``); maps over the frames of a video.

**Dual blocks.** Maps come from ``transformer_blocks``: HunyuanVideo 1.0 has 20 dual-stream blocks
followed by 40 single-stream blocks (text and video share their weights: not used), HunyuanVideo 1.5
has 54 dual-stream blocks and nothing else. Default: the deeper half of the dual blocks.

**Per dual block** the concept rows are updated with the block's *text* weights, as in FLUX.1:
``norm1_context`` (AdaLN-Zero), ``add_q/k/v_proj``, ``norm_added_q/k`` (RMSNorm), ``to_add_out``, the
gates, ``norm2_context`` and ``ff_context``. Concept queries attend to ``[video keys; concept keys]``
(the video keys after qk-norm and RoPE, read from the block's own processor through hooks).

**Positions.** RoPE covers the video tokens only (the joint order is ``[video, text]``); text tokens
have no positions, so concept rows get none.

**Token refiner.** A prompt reaches the dual blocks through ``context_embedder``, a token refiner:
its modulation is the timestep plus the prompt's mean (padding excluded) token embedding, and its
self-attention mixes the prompt's tokens. Each concept goes through the same refiner *alone*, as
the refiner would refine a prompt made of that concept's token rows only: its self-attention sees
only the concept's own rows, its pooled vector is their mean, its timestep the call's. Concepts
never see the prompt in the refiner and the prompt never sees them. This is part of encoding a
concept alone, so ``concept_modulation`` does not change it. HunyuanVideo 1.5 then adds the
refined-text type embedding (``cond_type_embed`` row 0), as it does for the prompt; its ByT5 glyph
rows and image rows are not text the concepts are encoded with.

**Modulation** of the dual blocks: HunyuanVideo 1.0 embeds timestep, guidance and the pooled CLIP
vector of the prompt (``time_text_embed``): ``concept_modulation="zero"`` (default, as FLUX.1)
recomputes it with a zero CLIP vector, ``"prompt"`` reuses the prompt's. HunyuanVideo 1.5 embeds the
timestep only (``time_embed``): both choices agree.

**Concepts** are encoded alone with the pipeline's own ``encode_prompt`` (LLM hidden states of the
prompt template; 1.5: the chat template with its system message). The concept's own tokens are those
between the template's common prefix and suffix (compared with the empty prompt's tokens, read from
the text encoder's input); the pipeline's template crop (``crop_start``) is taken into account.

**Classifier-free guidance.** ``HunyuanVideoPipeline`` names its calls ``cache_context("cond")`` /
``("uncond")`` (true CFG); the 1.0 image-to-video pipelines (``HunyuanVideoImageToVideoPipeline``,
``HunyuanSkyreelsImageToVideoPipeline``) call the prompt, then the negative prompt, unnamed: while the
session's pipeline runs, their layout is ``"sequential"``. ``HunyuanVideo15Pipeline`` (and its
image-to-video pipeline) runs its guider's batches under ``cache_context("pred_cond")`` /
``("pred_uncond")``. Maps come from the conditional calls.

**Real videos** (:func:`concept_attention.explain_video`): VAE latents (``latent_dist.mode()`` times
``scaling_factor``; handed to ``explain_video`` frames first, as it counts latent frames on axis 1) noised
by flow matching at ``t`` (timestep ``1000·t``), run with the prompt as the text-to-video pipeline builds
it (1.0: embedded guidance at the pipeline's default scale; 1.5: zero condition latents, mask and image
embeddings). Frames: ``4k + 1`` (causal VAE), by default up to the pipeline's default count (1.0: 129,
1.5: 121). Size: the shorter side scaled to ``concept_attention.json``'s ``size`` if set, else to the
pipeline's default size (1.0: 1280 × 720; 1.5: the 16:9 bucket of the model's ``target_size``, 848 × 480
at 480p). HunyuanVideo 1.0 image-to-video transformers (``image_condition_type``) take an image as well
and are refused there.

**Fused QKV.** diffusers' ``fuse_qkv_projections()`` leaves these models' attentions unfused, and
their processors always use ``to_q``/``to_k``/``to_v``, so fusing never changes a map.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..core.contract import CallState, ModelAdapter, Recorder, VideoAdapter, register_adapter
from ..core.defaults import pipeline_defaults
from .common import guidance_scale, timestep_value
from .encoding import call_default, select_rows, sequence_length
from .flux import FluxConceptProcessor
from .flux2 import concept_token_span

UNNAMED_CFG_PIPELINES = ("HunyuanVideoImageToVideoPipeline", "HunyuanSkyreelsImageToVideoPipeline")
"""HunyuanVideo 1.0 pipelines that call the transformer for the prompt, then the negative prompt, unnamed."""


class HunyuanConceptProcessor(FluxConceptProcessor):
    """FLUX.1's concept step on a Hunyuan dual block (same processor signature, block layout and text weights).

    Differences: RoPE tables cover the video (or image) tokens only, and the (legacy) ``Attention`` module
    knows its ``heads``, not its head size.
    """

    family_label = "HunyuanVideo"

    def image_activations(self, attn: nn.Module, text_len: int, rotary: Any) -> tuple[torch.Tensor, ...]:
        """Video keys after qk-norm and RoPE, values and pre-projection outputs, (B, N, H, D)."""
        image_key, image_value, image_output = self.captured()
        if rotary is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            image_key = apply_rotary_emb(image_key, rotary, sequence_dim=1)
        return image_key, image_value.unflatten(-1, (attn.heads, -1)), image_output.unflatten(-1, (attn.heads, -1))

    @staticmethod
    def text_projections(attn: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Concept queries, keys (RMS-normed) and values from the text weights, (B, r, H, D)."""
        query, key, value = (proj(normed).unflatten(-1, (attn.heads, -1))
                             for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        return attn.norm_added_q(query), attn.norm_added_k(key), value


def template_concept_rows(pipeline: Any, concepts: Sequence[str], **options: Any) -> list[torch.Tensor]:
    """Each concept encoded alone by ``pipeline.encode_prompt(prompt=[...], **options)``; its own tokens' rows.

    The token ids fed to ``pipeline.text_encoder`` are read with a pre-hook; a concept's tokens are those
    between the prefix and suffix it shares with the empty prompt, shifted by the template crop.
    """
    encoder = getattr(pipeline, "text_encoder", None)
    if encoder is None or not hasattr(pipeline, "encode_prompt"):
        raise TypeError(f"{type(pipeline).__name__} has no prompt encoder (text_encoder/encode_prompt); "
                        "pass concept_embeds=[...] to encode concepts yourself")
    fed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        fed.append((ids.cpu(), (torch.ones_like(ids) if mask is None else mask).cpu().bool()))

    handle = encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            embeds = pipeline.encode_prompt(prompt=[*concepts, ""], device=pipeline._execution_device, **options)[0]
    finally:
        handle.remove()
    ids, mask = (torch.cat([pair[i] for pair in fed]) for i in (0, 1))
    if ids.shape[0] != len(concepts) + 1 or ids.shape[1] < embeds.shape[1]:
        raise RuntimeError(f"the {type(pipeline).__name__} text encoder saw an unexpected batch; cannot locate "
                           "the concept tokens")
    crop = ids.shape[1] - embeds.shape[1]
    reference = ids[-1][mask[-1]].tolist()
    spans = [concept_token_span(ids[i], mask[i], reference) - crop for i in range(len(concepts))]
    return select_rows(concepts, embeds, [span[span >= 0].tolist() for span in spans])


class TokenRefinedStream(ModelAdapter):
    """What the Hunyuan families share: refined concept rows, dual-block processors, modulation, token grid."""

    processor_class_names: ClassVar[tuple[tuple[str, str], ...]] = ()
    """(module in ``diffusers.models.transformers``, class) of the dual blocks' attention processors."""
    processor_class: ClassVar[type[HunyuanConceptProcessor]] = HunyuanConceptProcessor
    time_embedding: ClassVar[str] = "time_embed"
    """The transformer's module whose output is the dual blocks' ``temb``."""
    text_type_embedding: ClassVar[bool] = False
    """Whether the model adds ``cond_type_embed`` row 0 to the refined prompt (HunyuanVideo 1.5)."""

    @property
    def concept_embed_dim(self) -> int:
        return int(self.transformer.config.text_embed_dim)

    def embed_concepts(self, embeds: torch.Tensor) -> torch.Tensor:
        """Unchanged: the token refiner needs the call's timestep, so it runs in each call (module docstring)."""
        return embeds

    def refine_concepts(self, refiner: nn.Module, rows: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Each concept's rows ``(B, n, text_dim)`` through the token refiner alone (no mask: every row is valid)."""
        assert self.recorder is not None
        parts = rows.split(list(self.recorder.concept_sizes), dim=1)
        refined = torch.cat([refiner.forward(part, timestep) for part in parts], dim=1)
        return refined + self.transformer.cond_type_embed.weight[0] if self.text_type_embedding else refined

    def _on_context_embedder(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self.current_call
        if call is not None and call.concepts is not None:
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            with torch.no_grad():
                call.concepts = self.refine_concepts(module, call.concepts, timestep)

    def _on_time_embedding(self, module: nn.Module, args: tuple, output: Any) -> None:
        call = self.current_call
        if call is not None:
            call.modulation = output

    def processor_classes(self) -> tuple[type, ...]:
        import importlib

        found = (getattr(importlib.import_module(f"diffusers.models.transformers.{module}"), name, None)
                 for module, name in self.processor_class_names)
        return tuple(cls for cls in found if cls is not None)

    def install(self, recorder: Recorder, blocks: Sequence[int]) -> None:
        self.attach(recorder)
        kind = self.processor_class
        self.wrap_processors(blocks, "attn", self.processor_classes(),
                             lambda original, block, index: kind(original, block, index, recorder))
        refiner = self.transformer.context_embedder.register_forward_hook(self._on_context_embedder, with_kwargs=True)
        self.on_undo(refiner.remove)
        timing = getattr(self.transformer, self.time_embedding).register_forward_hook(self._on_time_embedding)
        self.on_undo(timing.remove)

    # ------------------------------------------------------------------ calls
    def patch_sizes(self) -> tuple[int, ...]:
        """Patch size along the latent's (frame,) height and width axes."""
        config = self.transformer.config
        return int(config.patch_size_t), int(config.patch_size), int(config.patch_size)

    def begin_call(self, bound: inspect.BoundArguments, call: CallState) -> None:
        hidden = bound.arguments.get("hidden_states")
        patches = self.patch_sizes()
        if hidden is None or hidden.dim() != 2 + len(patches):
            raise ValueError(f"{type(self.transformer).__name__} was called without {2 + len(patches)}-D hidden_states")
        grid = tuple(int(size) // patch for size, patch in zip(hidden.shape[2:], patches))
        call.batch_size = hidden.shape[0]
        call.grid = grid
        call.num_map_tokens = math.prod(grid)
        timestep = timestep_value(bound.arguments.get("timestep"))
        call.timestep = None if timestep is None else timestep / 1000.0  # noise level, as FLUX pipelines pass it


class HunyuanVideoFamily(TokenRefinedStream, VideoAdapter):
    """Frame and size rules and VAE latents both HunyuanVideo versions share."""

    native_frames: ClassVar[int] = 129

    def frame_rule(self, pipeline: Any) -> tuple[int, int, int]:
        """(VAE temporal ratio, temporal patch, the pipeline's default frame count)."""
        native = call_default(pipeline, "num_frames") or self.native_frames
        return int(pipeline.vae_scale_factor_temporal), int(self.transformer.config.patch_size_t), int(native)

    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        """(native shorter side: ``concept_attention.json``'s ``size``, else the pipeline's default size; VAE scale
        × patch) in pixels."""
        native = pipeline_defaults(pipeline).get("size") or min(self.native_frame_size(pipeline))
        return int(native), int(pipeline.vae_scale_factor_spatial) * int(self.transformer.config.patch_size)

    def video_latents(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents of ``pixels`` (1, 3, F, H, W), frames first ``(1, F, C, h, w)`` as ``explain_video``
        reads them (and draws noise); :meth:`noised` puts them back in the transformer's ``(B, C, F, h, w)``."""
        vae, transformer = pipeline.vae, self.transformer
        with torch.no_grad():
            encoded = vae.encode(pixels.to(device=transformer.device, dtype=vae.dtype)).latent_dist.mode()
        return (encoded * vae.config.scaling_factor).to(transformer.dtype).transpose(1, 2)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timestep: float) -> torch.Tensor:
        """``(1 − t)·latents + t·noise`` (flow matching), ``(B, C, F, h, w)``, from frames-first tensors."""
        return ((1.0 - timestep) * latents + timestep * noise).transpose(1, 2).to(self.transformer.dtype)


@register_adapter
class HunyuanVideoAdapter(HunyuanVideoFamily):
    """HunyuanVideo 1.0 (``HunyuanVideoTransformer3DModel``): 20 dual + 40 single blocks, pooled CLIP modulation."""

    family = "hunyuanvideo"
    transformer_class_names = ("HunyuanVideoTransformer3DModel",)
    processor_class_names = (("transformer_hunyuan_video", "HunyuanVideoAttnProcessor2_0"),)
    time_embedding = "time_text_embed"

    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        length = sequence_length(pipeline, max_sequence_length, 256)
        return template_concept_rows(pipeline, concepts, max_sequence_length=length)

    def pipeline_cfg(self, pipeline: Any, call_arguments: inspect.BoundArguments) -> str:
        """``HunyuanVideoPipeline`` names its calls; the image-to-video pipelines run the prompt, then the negative
        prompt, unnamed (true CFG: ``true_cfg_scale > 1`` and a negative prompt)."""
        if type(pipeline).__name__ not in UNNAMED_CFG_PIPELINES:
            return "context"
        given = call_arguments.arguments
        negative = given.get("negative_prompt") is not None or (
            given.get("negative_prompt_embeds") is not None and given.get("negative_pooled_prompt_embeds") is not None)
        return "sequential" if negative and guidance_scale(call_arguments, "true_cfg_scale") > 1 else "none"

    def _on_time_embedding(self, module: nn.Module, args: tuple, output: Any) -> None:
        """``time_text_embed(timestep, pooled CLIP, guidance)``: the prompt's, or recomputed with a zero CLIP vector."""
        call = self.current_call
        if call is None or self.recorder is None:
            return
        if self.recorder.concept_modulation == "prompt":
            call.modulation = output[0]
            return
        timestep, pooled, *rest = args
        with torch.no_grad():
            call.modulation = module.forward(timestep, torch.zeros_like(pooled), *rest)[0]

    # ------------------------------------------------------------------ real videos
    def native_frame_size(self, pipeline: Any) -> tuple[int, int]:
        """The pipeline's default size (1280 × 720)."""
        return int(call_default(pipeline, "width") or 1280), int(call_default(pipeline, "height") or 720)

    def video_latents(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        condition = self.transformer.config.image_condition_type
        if condition is not None:
            raise TypeError(f"{type(pipeline).__name__} has an image-to-video transformer (image_condition_type="
                            f"{condition!r}); explaining real videos needs a text-to-video HunyuanVideo model")
        return super().video_latents(pipeline, pixels)

    def video_inputs(self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, prompt: str,
                     timestep: float, max_sequence_length: int | None) -> dict[str, Any]:
        """As ``HunyuanVideoPipeline`` calls the transformer (embedded guidance at the pipeline's default scale)."""
        transformer = self.transformer
        device, dtype, count = transformer.device, transformer.dtype, noise.shape[0]
        with torch.no_grad():
            embeds, pooled, mask = pipeline.encode_prompt(
                prompt=prompt, num_videos_per_prompt=count, device=device,
                max_sequence_length=sequence_length(pipeline, max_sequence_length, 256))
        inputs = {"hidden_states": self.noised(latents, noise, timestep),
                  "timestep": torch.full((count,), 1000.0 * timestep, device=device, dtype=dtype),
                  "encoder_hidden_states": embeds.to(dtype), "encoder_attention_mask": mask.to(dtype),
                  "pooled_projections": pooled.to(dtype), "return_dict": False}
        if transformer.config.guidance_embeds:
            scale = float(call_default(pipeline, "guidance_scale") or 6.0)
            inputs["guidance"] = torch.full((count,), 1000.0 * scale, device=device, dtype=dtype)
        return inputs


@register_adapter
class HunyuanVideo15Adapter(HunyuanVideoFamily):
    """HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``) 480p / 720p: 54 dual blocks."""

    family = "hunyuanvideo15"
    transformer_class_names = ("HunyuanVideo15Transformer3DModel",)
    processor_class_names = (("transformer_hunyuan_video15", "HunyuanVideo15AttnProcessor2_0"),)
    text_type_embedding = True
    native_frames = 121
    default_concept_modulation = "prompt"
    """The dual blocks' modulation depends on the timestep only, so both choices agree."""

    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        return template_concept_rows(pipeline, concepts, batch_size=len(concepts) + 1)

    # ------------------------------------------------------------------ real videos
    def native_frame_size(self, pipeline: Any) -> tuple[int, int]:
        """The pipeline's default 16:9 size for the model's ``target_size`` (480p: 848 × 480)."""
        height, width = pipeline.video_processor.calculate_default_height_width(
            pipeline.default_aspect_ratio[1], pipeline.default_aspect_ratio[0], pipeline.target_size)
        return int(width), int(height)

    def video_inputs(self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, prompt: str,
                     timestep: float, max_sequence_length: int | None) -> dict[str, Any]:
        """As ``HunyuanVideo15Pipeline`` calls the transformer: zero condition latents, mask and image embeddings."""
        device, dtype, count = self.transformer.device, self.transformer.dtype, noise.shape[0]
        noised = self.noised(latents, noise, timestep)
        condition, mask = pipeline.prepare_cond_latents_and_mask(noised, dtype, device)
        with torch.no_grad():
            embeds, embeds_mask, glyphs, glyphs_mask = pipeline.encode_prompt(
                prompt=prompt, device=device, dtype=dtype, batch_size=1, num_videos_per_prompt=count)
        image_embeds = torch.zeros(count, pipeline.vision_num_semantic_tokens, pipeline.vision_states_dim,
                                   device=device, dtype=dtype)
        return {"hidden_states": torch.cat([noised, condition, mask], dim=1), "image_embeds": image_embeds,
                "timestep": torch.full((count,), 1000.0 * timestep, device=device, dtype=dtype),
                "encoder_hidden_states": embeds, "encoder_attention_mask": embeds_mask,
                "encoder_hidden_states_2": glyphs, "encoder_attention_mask_2": glyphs_mask, "return_dict": False}
