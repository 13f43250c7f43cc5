"""Stable Diffusion 3 / 3.5 adapter (``SD3Transformer2DModel``, ``StableDiffusion3Pipeline``).

Semantics follow FLUX.1 (paper §4.1): ``o_x`` is the image output of the model's **own** joint
attention (read before ``to_out``), never of a second attention in which image queries also see
the concepts. Per joint block the concept rows are updated with the block's *text* weights:
``norm1_context`` (AdaLN-Zero), ``add_q/k/v_proj``, ``norm_added_q/k`` (SD3.5 qk-norm),
``to_add_out``, gates, ``norm2_context`` and ``ff_context``. Concept queries attend to
``[image keys; concept keys]``. SD3 has no RoPE (absolute position embeddings are added to image
patches only), so concepts get no positional signal, like the prompt.

Choices specific to this family:

* **Concept tokens.** Each concept is encoded alone through the pipeline's own ``encode_prompt``
  (``[CLIP-L ‖ CLIP-G padded to 4096 ; T5]`` along the sequence). Which of its rows form the
  concept is set by ``pipe.concept_attention_defaults["sd3_concept_tokens"]`` (also readable from
  a pipeline directory's ``concept_attention.json``):

  - ``"clip"`` (default): the CLIP rows of the concept's word pieces (no BOS/EOS/padding). This
    is what the authors' SD3 code uses, and it works when T5 is dropped (``text_encoder_3=None``).
  - ``"t5"``: the T5 rows of the concept's word pieces (no ``</s>``/padding), as for FLUX.1.
  - ``"both"``: the CLIP rows followed by the T5 rows (all averaged into one concept score).

  ``concept_embeds=[...]`` (rows in the 4096-wide prompt-embedding space) bypasses this.
* **Concept modulation.** ``"prompt"`` reuses the prompt's ``temb`` (timestep + pooled CLIP
  vector), as the authors' SD3 code does; it is this family's declared default
  (:attr:`SD3Adapter.default_concept_modulation`). ``"zero"`` recomputes ``time_text_embed``
  with a zero pooled vector. A session without ``concept_modulation`` uses this family default.
* **Batched CFG.** ``StableDiffusion3Pipeline`` runs ``[uncond, cond]`` in one batch when
  ``guidance_scale > 1``: while the session's pipeline runs, the layout is ``"batched"``. Concept rows
  run for the whole batch (each half beside its own image); maps are read from the conditional
  half only. Other calls (a bare transformer, ``explain``) map every row unless ``cfg=`` says otherwise.
* **Last block** (``context_pre_only=True``): ``norm1_context`` is ``AdaLayerNormContinuous``
  (no gates) and there is no ``to_add_out``/text MLP. It still contributes a map from its
  pre-projection concept output; the concept stream ends there.
* **SD3.5 ``attn2``** (image-only self-attention, same processor object): left untouched; the
  concept processor is installed on ``.attn`` only.
* **Skip-layer guidance.** The pipeline's extra ``skip_layers`` call is an auxiliary guidance
  call (:meth:`SD3Adapter.is_auxiliary_call`): it is not mapped and not counted as a step. In a mapped call with ``skip_layers`` (a
  bare transformer call), skipped blocks skip the concept update too (their processor never runs).
* **Fused QKV.** Installing after ``fuse_qkv_projections()`` wraps ``FusedJointAttnProcessor2_0``
  (which applies no qk-norm, so neither does the concept stream). Fusing *while installed*
  replaces every processor; the next transformer call detects it and wraps the new processors,
  and leaving the session keeps the fused processors (and cleans ``original_attn_processors``).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..core.contract import CallState, ExplainRequest, ModelAdapter, Recorder, refuse_unknown, register_adapter
from ..core.defaults import pipeline_defaults
from .common import flow_noised, full_timestep, guidance_scale, hook_time_embedding, latent_size_rule, \
    timestep_value, vae_latents
from .encoding import select_rows, sequence_length, word_positions
from .wrapping import Capture, Update, WrappingProcessor, modulated, text_stream_update

CONCEPT_TOKENS = ("clip", "t5", "both")
"""Values of ``concept_attention_defaults["sd3_concept_tokens"]``."""


def _processor_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(known SD3 joint processors, the fused ones among them)."""
    from diffusers.models import attention_processor as ap

    plain = tuple(getattr(ap, n) for n in ("JointAttnProcessor2_0",) if hasattr(ap, n))
    fused = tuple(getattr(ap, n) for n in ("FusedJointAttnProcessor2_0",) if hasattr(ap, n))
    return plain + fused, fused


class _Capture(Capture):
    """Image keys/values/outputs of one joint attention; keys are head-major when qk-normed."""

    def __init__(self) -> None:
        super().__init__()
        self.key_head_major = False  # image_key is (B, H, N, D) (after norm_k), else (B, N, inner)

    def on_qkv(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Fused ``to_qkv`` (no qk-norm in the fused processor): keys and values."""
        if self.enabled:
            _, self.image_key, self.image_value = output.chunk(3, dim=-1)


class SD3ConceptProcessor(WrappingProcessor):
    """Wraps a joint block's SD3 attention processor and runs the concept stream beside it.

    Returns exactly what the wrapped processor returns; all concept state lives on the session.
    """

    family_label = "SD3"
    processor_label = "joint attention processor"
    capture_class = _Capture

    def __init__(self, inner: Any, block: nn.Module, block_index: int, recorder: Recorder) -> None:
        super().__init__(inner, block, block_index, recorder)
        self.fused = isinstance(inner, _processor_classes()[1])

    # Attention.forward filters kwargs by this signature: keep it identical to JointAttnProcessor2_0.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    def hook(self, attn: nn.Module) -> None:
        capture = self.capture
        if self.fused:
            self._handles.append(attn.to_qkv.register_forward_hook(capture.on_qkv))
        else:
            key_module = attn.norm_k if attn.norm_k is not None else attn.to_k
            capture.key_head_major = attn.norm_k is not None  # the processor norms (B, H, N, D)
            self._handles += [
                key_module.register_forward_hook(capture.on_key),
                attn.to_v.register_forward_hook(capture.on_value),
            ]
        self._handles.append(attn.to_out[0].register_forward_pre_hook(capture.on_output))

    def _hook_fused_projection(self, attn: nn.Module) -> None:
        """Nothing to add at call time: :meth:`hook` knew from the processor class whether it is fused."""

    def _concept_step(self, attn: nn.Module, call: CallState, text_len: int, *args: Any, **kwargs: Any
                      ) -> Update | None:
        block, concepts = self.block, call.concepts
        image_key, image_value, image_output = self._image_activations(attn)
        if block.context_pre_only:  # last block: no gates, no text output projection or MLP
            normed = block.norm1_context(concepts, call.modulation)
        else:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(concepts, emb=call.modulation)
        query, key, value = self._projections(attn, normed)
        output = self.recorder.attend_and_record(self.slot, query, key, value, image_key, image_value,
                                                 image_output)
        if block.context_pre_only:
            return None  # the concept stream ends here
        return lambda: text_stream_update(
            concepts, attn.to_add_out(output.flatten(2).to(concepts.dtype)), gate_msa.unsqueeze(1),
            modulated(block.norm2_context, shift_mlp[:, None], scale_mlp[:, None]), gate_mlp.unsqueeze(1),
            block.ff_context)

    def _image_activations(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image keys, values and pre-projection outputs, (B, N, H, D)."""
        image_key, image_value, image_output = self.captured()
        heads = attn.heads
        image_key = image_key.transpose(1, 2) if self.capture.key_head_major else image_key.unflatten(-1, (heads, -1))
        return image_key, image_value.unflatten(-1, (heads, -1)), image_output.unflatten(-1, (heads, -1))

    def _projections(self, attn: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concept queries, keys and values with the text weights; qk-norm as the processor in use applies it."""
        heads = attn.heads
        query, key, value = (proj(normed).unflatten(-1, (heads, -1))
                             for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if not self.fused:  # the fused SD3 processor applies no qk-norm; mirror the processor in use
            query = attn.norm_added_q(query) if attn.norm_added_q is not None else query
            key = attn.norm_added_k(key) if attn.norm_added_k is not None else key
        return query, key, value


@register_adapter
class SD3Adapter(ModelAdapter):
    """Stable Diffusion 3 / 3.5 (large, medium, turbo) ``SD3Transformer2DModel`` checkpoints."""

    family = "sd3"
    transformer_class_names = ("SD3Transformer2DModel",)
    default_concept_modulation: ClassVar[str] = "prompt"
    default_concept_tokens: ClassVar[str] = "clip"

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__(transformer)
        self._wrappers: dict[int, SD3ConceptProcessor] = {}
        self._all_wrappers: list[SD3ConceptProcessor] = []

    # ------------------------------------------------------------------ concepts
    def concept_tokens(self, pipeline: Any) -> str:
        """The token-row choice for concepts: ``"clip"``, ``"t5"`` or ``"both"``."""
        choice = pipeline_defaults(pipeline).get("sd3_concept_tokens", self.default_concept_tokens)
        if choice not in CONCEPT_TOKENS:
            raise ValueError(f"sd3_concept_tokens must be one of {', '.join(CONCEPT_TOKENS)}, not {choice!r}")
        return choice

    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        if not hasattr(pipeline, "encode_prompt") or getattr(pipeline, "tokenizer", None) is None:
            raise TypeError(
                f"{type(pipeline).__name__} has no SD3 prompt encoder; pass concept_embeds=[...] to encode "
                "concepts yourself"
            )
        choice = self.concept_tokens(pipeline)
        has_t5 = getattr(pipeline, "text_encoder_3", None) is not None and getattr(pipeline, "tokenizer_3", None)
        if choice != "clip" and not has_t5:
            raise ValueError(
                f"sd3_concept_tokens={choice!r} needs the T5 encoder, but this pipeline has text_encoder_3=None; "
                "use 'clip'"
            )
        length = sequence_length(pipeline, max_sequence_length, 256)
        with torch.no_grad():
            embeds = pipeline.encode_prompt(
                prompt=list(concepts), prompt_2=None, prompt_3=None, device=pipeline._execution_device,
                num_images_per_prompt=1, do_classifier_free_guidance=False, max_sequence_length=length,
            )[0]
        clip_length = embeds.shape[1] - length
        rows: list[list[int]] = [[] for _ in concepts]
        if choice in ("clip", "both"):
            for i, found in enumerate(word_positions(pipeline.tokenizer, concepts, clip_length)):
                rows[i] += found
        if choice in ("t5", "both"):
            for i, found in enumerate(word_positions(pipeline.tokenizer_3, concepts, length)):
                rows[i] += [clip_length + j for j in found]
        return select_rows(concepts, embeds, rows)

    # ------------------------------------------------------------------ real images
    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        return latent_size_rule(pipeline, int(self.transformer.config.patch_size))

    def explain_inputs(self, request: ExplainRequest) -> dict[str, Any]:
        pipeline, transformer = request.pipeline, self.transformer
        noised = flow_noised(vae_latents(request, self), request, self)
        with torch.no_grad():
            prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
                prompt=request.prompt, prompt_2=None, prompt_3=None, device=transformer.device,
                num_images_per_prompt=request.num_samples, do_classifier_free_guidance=False,
                max_sequence_length=sequence_length(pipeline, request.max_sequence_length, 256))
        return {"hidden_states": noised, "encoder_hidden_states": prompt_embeds.to(transformer.dtype),
                "pooled_projections": pooled.to(transformer.dtype), "timestep": full_timestep(request, self, 1000.0),
                "return_dict": False}

    # ------------------------------------------------------------------ calls
    def pipeline_cfg(self, pipeline: Any, call_arguments: inspect.BoundArguments) -> str:
        """``StableDiffusion3Pipeline`` batches ``[uncond, cond]`` when ``guidance_scale > 1``."""
        return "batched" if guidance_scale(call_arguments, "guidance_scale") > 1 else "none"

    def is_auxiliary_call(self, bound: inspect.BoundArguments) -> bool:
        """The pipeline's skip-layer-guidance call (``skip_layers`` given) is neither cond nor uncond."""
        return bool(bound.arguments.get("skip_layers"))

    def begin_call(self, bound: inspect.BoundArguments, call: CallState) -> None:
        hidden = bound.arguments.get("hidden_states")
        if hidden is None or hidden.dim() != 4:
            raise ValueError("SD3Transformer2DModel was called without a (batch, channels, height, width) latent")
        self._rewrap_replaced_processors()
        patch = int(self.transformer.config.patch_size)
        call.batch_size = hidden.shape[0]
        call.grid = (hidden.shape[-2] // patch, hidden.shape[-1] // patch)
        call.num_map_tokens = call.grid[0] * call.grid[1]
        call.skipped_blocks = tuple(bound.arguments.get("skip_layers") or ())
        timestep = timestep_value(bound.arguments.get("timestep"))
        if timestep is not None:
            call.timestep = timestep / 1000.0  # noise level, as FLUX pipelines pass it

    # ------------------------------------------------------------------ install
    def install(self, recorder: Recorder, blocks: Sequence[int]) -> None:
        known, _ = _processor_classes()
        for index in blocks:
            refuse_unknown(self.dual_blocks[index].attn.processor, known, self.family,
                           f"transformer_blocks.{index}.attn")
        self.attach(recorder)
        self.on_undo(self._unwrap_all)
        for index in blocks:
            self._wrap(index)
        hook_time_embedding(self, self.transformer.time_text_embed)

    def _wrap(self, index: int) -> None:
        assert self.recorder is not None
        block = self.dual_blocks[index]
        wrapper = SD3ConceptProcessor(block.attn.processor, block, index, self.recorder)
        wrapper.hook(block.attn)
        block.attn.processor = wrapper  # direct assignment: .attn only, attn2 keeps its processor
        self._wrappers[index] = wrapper
        self._all_wrappers.append(wrapper)

    def _rewrap_replaced_processors(self) -> None:
        """Re-wrap processors replaced while installed (``fuse_qkv_projections()`` replaces all)."""
        known, _ = _processor_classes()
        for index, wrapper in list(self._wrappers.items()):
            current = self.dual_blocks[index].attn.processor
            if isinstance(current, SD3ConceptProcessor) and current.recorder is self.recorder:
                self._wrappers[index] = current
                continue
            if type(current) not in known:
                raise RuntimeError(
                    f"transformer_blocks.{index}.attn.processor was replaced by {type(current).__name__} while "
                    "ConceptAttention was installed; set processors before entering the session"
                )
            self._wrap(index)

    def _unwrap_all(self) -> None:
        for block in self.dual_blocks:
            current = block.attn.processor
            if isinstance(current, SD3ConceptProcessor) and current.recorder is self.recorder:
                block.attn.processor = current.inner
        saved = getattr(self.transformer, "original_attn_processors", None)
        if isinstance(saved, dict):  # fuse_qkv_projections() saved our wrappers for unfuse_qkv_projections()
            for name, processor in list(saved.items()):
                if isinstance(processor, SD3ConceptProcessor):
                    saved[name] = processor.inner
        for wrapper in self._all_wrappers:
            wrapper.unhook()
        self._all_wrappers.clear()
        self._wrappers.clear()
