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
  with a zero pooled vector. The adapter always follows the session's ``concept_modulation``;
  a session whose core does not yet resolve an unset option to the family default uses its own
  default (``"zero"``), so pass ``concept_modulation="prompt"`` to match the authors' SD3 runs.
* **Batched CFG.** ``StableDiffusion3Pipeline`` runs ``[uncond, cond]`` in one batch. Concept rows
  run for the whole batch (each half beside its own image); maps are read from the conditional
  half only. A direct transformer call (not made by a running pipeline) maps every row.
* **Last block** (``context_pre_only=True``): ``norm1_context`` is ``AdaLayerNormContinuous``
  (no gates) and there is no ``to_add_out``/text MLP. It still contributes a map from its
  pre-projection concept output; the concept stream ends there.
* **SD3.5 ``attn2``** (image-only self-attention, same processor object): left untouched; the
  concept processor is installed on ``.attn`` only.
* **Skip-layer guidance.** The pipeline's extra ``skip_layers`` call is an auxiliary guidance
  call: it is not mapped and not counted as a step. In a mapped call with ``skip_layers`` (a
  bare transformer call), skipped blocks skip the concept update too (their processor never runs).
* **Fused QKV.** Installing after ``fuse_qkv_projections()`` wraps ``FusedJointAttnProcessor2_0``
  (which applies no qk-norm, so neither does the concept stream). Fusing *while installed*
  replaces every processor; the next transformer call detects it and wraps the new processors,
  and leaving the session keeps the fused processors (and cleans ``original_attn_processors``).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from torch import nn

from ..loading import pipeline_defaults
from .base import (
    ModelAdapter, latent_size_rule, pooled_text_modulation, register_adapter, running_pipeline, timestep_value,
)
from .encoding import select_rows, sequence_length, word_positions
from .wrapping import Capture, WrappingProcessor

if TYPE_CHECKING:  # pragma: no cover
    from ..core.session import CallState, ConceptAttention

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

    def __init__(self, inner: Any, block: nn.Module, block_index: int, session: "ConceptAttention") -> None:
        super().__init__(inner, block, block_index, session)
        self.fused = isinstance(inner, _processor_classes()[1])

    # Attention.forward filters kwargs by this signature: keep it identical to JointAttnProcessor2_0.
    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
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

    def _concept_step(self, attn: nn.Module, call: "CallState", text_len: int, *args: Any, **kwargs: Any) -> None:
        block, session = self.block, self.session
        image_key, image_value, image_output = self.captured()
        heads = attn.heads
        if self.capture.key_head_major:
            image_key = image_key.transpose(1, 2)
        else:
            image_key = image_key.unflatten(-1, (heads, -1))
        image_value = image_value.unflatten(-1, (heads, -1))
        image_output = image_output.unflatten(-1, (heads, -1))

        concepts = call.concepts
        temb = call.extras["concept_temb"]
        if block.context_pre_only:
            normed = block.norm1_context(concepts, temb)
            gate_msa = shift_mlp = scale_mlp = gate_mlp = None
        else:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(concepts, emb=temb)
        query = attn.add_q_proj(normed).unflatten(-1, (heads, -1))
        key = attn.add_k_proj(normed).unflatten(-1, (heads, -1))
        value = attn.add_v_proj(normed).unflatten(-1, (heads, -1))
        if not self.fused:  # the fused SD3 processor applies no qk-norm; mirror the processor in use
            if attn.norm_added_q is not None:
                query = attn.norm_added_q(query)
            if attn.norm_added_k is not None:
                key = attn.norm_added_k(key)
        concept_output = session.attend_and_record(
            self.block_index, query, key, value, image_key, image_value, image_output
        )
        if block.context_pre_only:
            return  # the last block has no text output projection or MLP: the concept stream ends
        attended = attn.to_add_out(concept_output.flatten(2).to(concepts.dtype))
        concepts = concepts + gate_msa.unsqueeze(1) * attended
        normed = block.norm2_context(concepts) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        concepts = concepts + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        call.concepts = concepts


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

    @property
    def dual_blocks(self) -> Sequence[nn.Module]:
        return self.transformer.transformer_blocks

    @property
    def concept_embed_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    # ------------------------------------------------------------------ concepts
    def concept_tokens(self, pipeline: Any) -> str:
        """The token-row choice for concepts: ``"clip"``, ``"t5"`` or ``"both"``."""
        choice = pipeline_defaults(pipeline).get("sd3_concept_tokens", self.default_concept_tokens)
        if choice not in CONCEPT_TOKENS:
            raise ValueError(f"sd3_concept_tokens must be one of {', '.join(CONCEPT_TOKENS)}, not {choice!r}")
        return choice

    def encode_concepts(
        self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
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
        noised = self.noised_latents(pipeline, pixels, timestep, noise, num_samples, generator)
        length = sequence_length(pipeline, max_sequence_length, 256)
        with torch.no_grad():
            prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=num_samples,
                do_classifier_free_guidance=False, max_sequence_length=length,
            )
        return {
            "hidden_states": noised,
            "encoder_hidden_states": prompt_embeds.to(dtype),
            "pooled_projections": pooled.to(dtype),
            "timestep": torch.full((num_samples,), float(timestep) * 1000.0, device=device, dtype=dtype),
            "return_dict": False,
        }

    # ------------------------------------------------------------------ calls
    def is_conditional_call(self, bound: inspect.BoundArguments, context_name: str | None) -> bool:
        if not super().is_conditional_call(bound, context_name):
            return False
        if bound.arguments.get("skip_layers") and running_pipeline(self.transformer) is not None:
            return False  # skip-layer guidance's auxiliary call
        return True

    def begin_call(self, bound: inspect.BoundArguments, call: "CallState") -> None:
        arguments = bound.arguments
        hidden = arguments.get("hidden_states")
        if hidden is None or hidden.dim() != 4:
            raise ValueError("SD3Transformer2DModel was called without a (batch, channels, height, width) latent")
        self._rewrap_replaced_processors()
        patch = int(self.transformer.config.patch_size)
        call.batch_size = hidden.shape[0]
        call.grid = (hidden.shape[-2] // patch, hidden.shape[-1] // patch)
        call.num_map_tokens = call.grid[0] * call.grid[1]
        timestep = timestep_value(arguments.get("timestep"))
        if timestep is not None:
            call.timestep = timestep / 1000.0  # noise level, as FLUX pipelines pass it
        pipeline = running_pipeline(self.transformer)
        if (
            call.batch_size % 2 == 0
            and pipeline is not None
            and bool(getattr(pipeline, "do_classifier_free_guidance", False))
            and not arguments.get("skip_layers")
        ):
            call.map_rows = slice(call.batch_size // 2, call.batch_size)  # [uncond, cond]
        call.concepts = self.concept_rows(hidden.dtype, hidden.device).unsqueeze(0).expand(call.batch_size, -1, -1)

    def _on_time_embedding(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        pooled_text_modulation(self._session, module, args, output)

    # ------------------------------------------------------------------ install
    def install(self, session: "ConceptAttention", blocks: Sequence[int]) -> None:
        known, _ = _processor_classes()
        all_blocks = self.dual_blocks
        for index in blocks:
            processor = all_blocks[index].attn.processor
            if type(processor) not in known:
                raise TypeError(
                    f"transformer_blocks.{index}.attn uses {type(processor).__name__}, which the SD3 adapter does "
                    f"not know (expected {', '.join(c.__name__ for c in known)}); remove IP-adapters, PAG or "
                    "custom processors before using ConceptAttention"
                )
        self.attach(session)
        self.on_undo(self._unwrap_all)
        for index in blocks:
            self._wrap(index)
        handle = self.transformer.time_text_embed.register_forward_hook(self._on_time_embedding)
        self.on_undo(handle.remove)

    def _wrap(self, index: int) -> None:
        assert self._session is not None
        block = self.dual_blocks[index]
        wrapper = SD3ConceptProcessor(block.attn.processor, block, index, self._session)
        wrapper.hook(block.attn)
        block.attn.processor = wrapper  # direct assignment: .attn only, attn2 keeps its processor
        self._wrappers[index] = wrapper
        self._all_wrappers.append(wrapper)

    def _rewrap_replaced_processors(self) -> None:
        """Re-wrap processors replaced while installed (``fuse_qkv_projections()`` replaces all)."""
        known, _ = _processor_classes()
        for index, wrapper in list(self._wrappers.items()):
            current = self.dual_blocks[index].attn.processor
            if isinstance(current, SD3ConceptProcessor) and current.session is self._session:
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
            if isinstance(current, SD3ConceptProcessor) and current.session is self._session:
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
