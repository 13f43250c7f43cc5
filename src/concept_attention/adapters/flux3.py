"""FLUX.3 adapter (``Flux3Transformer2DModel``; ``Flux3ModularPipeline`` and ``Flux3DistilledModularPipeline``).

**Where text meets the image.** FLUX.3 first runs each token mode through its own per-mode blocks
(``txt_mode_blocks`` for the text, ``mode_blocks["image"]`` for the image): there text and image never
attend to each other, so these blocks give no map. Then the text and the image tokens are concatenated
for the joint ``single_transformer_blocks``: **one set of weights** (``norm``, ``to_q/to_k/to_v``,
``norm_q/k``, ``to_out``, the parallel feed-forward ``ff``) for both, but **separate modulation**:
text rows are modulated by ``single_stream_modulations["txt"]``, image rows by the image head. That is
CogView4's layout, so the concept stream runs in the joint blocks with the shared weights and the
*text* modulation. Maps come from the joint blocks (``dual_blocks`` here); default: the deeper half.

**Per joint block** a concept row is ``norm``-ed and modulated with the text's shift/scale, projected by
the shared ``to_q/to_k/to_v`` and qk-norm, rotated at its text position; concept queries attend to
``[image keys (after qk-norm and RoPE, reference-image keys included); concept keys]``; the row is then
updated as the block updates a text row: ``+ gate · (to_out(o_c) + ff(modulated row))`` (parallel block).

**Concept rows before the joint blocks.** A prompt reaches the joint blocks through ``context_embedder``
and the ``txt_mode_blocks``; so do the concepts, each concept **alone** through the text-mode blocks (their
self-attention sees only the concept's own rows, at its own positions, with the text-mode modulation), as
if the concept were the prompt. This is part of encoding a concept alone, as the token refiner is for
HunyuanVideo; the concepts first meet each other (and the image) in the joint blocks.

**Modulation.** Text rows are modulated by the embedding of timestep 0 (plus, for the step-distilled
flow-map checkpoints, the embedding of the timestep the step jumps to), the same for every text row and
independent of the prompt: ``concept_modulation`` ``"zero"`` and ``"prompt"`` coincide.

**Positions (RoPE).** Text token ``i`` of the padded, chat-templated prompt sits at ``(t, h, w, l) =
(0, 0, 0, i)``. A concept row keeps the index its token has when the concept is encoded alone in the
template (``<|im_start|>user\\n`` comes first, so a one-token concept sits at ``l = 3``); concepts given as
``concept_embeds`` get ``0..n-1``.

**Concepts** are encoded one at a time with the modular pipeline's own text-encoder step
(``Flux3TextEncoderStep``: Qwen3-VL chat template, right padding to its ``pad_multiple``, stacked hidden
layers): a concept's rows are its own tokens, those between the template's common prefix and suffix with
the empty prompt's (padding removed), read from the token ids the text encoder saw.

**CFG.** The denoise step's guider calls the transformer for the prompt, then (classifier-free guidance
on) for the negative prompt, at the same timestep and without cache-context names: while the session's
pipeline runs its layout is ``"sequential"`` (maps from the first call of each step).

**Reference images** (image-conditioned generation) are appended after the image tokens: maps cover the
generated image only, concepts attend to the reference tokens too.

**Real images** (:meth:`Flux3Adapter.explain_inputs`): the picture is VAE-encoded by the pipeline's own
``Flux3VaeEncoderStep`` (2×2 patchify, batch-norm statistics), noised by flow matching at ``t`` (the
transformer's timestep is ``t`` itself), on the pipeline's image position grid; flow-map checkpoints get
``target_timestep = t`` (no jump).

**Front ends.** FLUX.3 ships as a ``ModularPipeline`` only: ``ConceptAttention(pipe, concepts)`` works on it
(call it as usual, e.g. ``pipe(prompt=..., output="images")``); the CLI, the web app and ``explain()`` load and
call ``DiffusionPipeline`` pipelines and do not take it.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import nn

from ..core.contract import CallState, ExplainRequest, ModelAdapter, Recorder, register_adapter
from .common import flow_noised, full_timestep, latent_size_rule, timestep_value
from .encoding import own_rows
from .wrapping import Update, WrappingProcessor


def _known_processor_classes() -> tuple[type, ...]:
    from diffusers.models.transformers import transformer_flux3

    found = getattr(transformer_flux3, "Flux3AttnProcessor", None)
    return (found,) if found is not None else ()


def _rotated(rows: torch.Tensor, rotary: Any) -> torch.Tensor:
    """``rows`` (B, S, H, D) rotated by FLUX.3's real RoPE ``(cos, sin)``, each (S, D)."""
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(rows, rotary, sequence_dim=1)


class WithoutText:
    """An original processor of a joint (single-sequence) attention as the shared wrapper calls it: the wrapper
    passes a text argument second, which this drops (``slot=False``) or replaces by None (``slot=True``, for
    processors that take an unused ``encoder_hidden_states``). Its attributes (e.g. the attention backend diffusers
    sets on processors) are the original's."""

    def __init__(self, original: Any, slot: bool = False) -> None:
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_slot", slot)

    def __call__(self, attn: nn.Module, hidden: torch.Tensor, _text: Any, *rest: Any, **options: Any) -> Any:
        return self._original(attn, hidden, *((None,) if self._slot else ()), *rest, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._original, name, value)


class Flux3ConceptProcessor(WrappingProcessor):
    """Wraps a joint block's original ``Flux3AttnProcessor`` (one joint ``[text, image]`` sequence) and runs the
    concept stream beside it. Returns exactly what the original processor returns.

    The joint attention gets no separate text argument; the text length is the row count of the text
    modulation (``call.modulation``, one row per text token), handed to the shared wrapper in its place.
    """

    family_label = "FLUX.3"

    def __init__(self, inner: Any, block: nn.Module, block_index: int, recorder: Recorder) -> None:
        super().__init__(WithoutText(inner), block, block_index, recorder)

    # Flux3Attention.forward calls its processor positionally: keep the signature of Flux3AttnProcessor.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None) -> Any:
        call = self.recorder.current_call
        text = None if call is None else call.modulation
        return self._run(attn, hidden_states, text, attention_mask, image_rotary_emb)

    def _concept_step(self, attn: nn.Module, call: CallState, text_len: int, attention_mask: Any,
                      rotary: Any) -> Update:
        block, concepts = self.block, call.concepts
        shift, scale, gate = call.modulation[:, :1].chunk(3, dim=-1)  # every text row has the same modulation
        normed = (1 + scale) * block.norm(concepts) + shift
        query, key, value = (proj(normed).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query.float()), attn.norm_k(key.float())
        if rotary is not None:
            query, key = _rotated(query, call.concept_rotary), _rotated(key, call.concept_rotary)
        image = self._image_tokens(attn, text_len, rotary)
        output = self.recorder.attend_and_record(self.slot, query.to(value.dtype), key.to(value.dtype), value, *image)

        def update() -> torch.Tensor:
            attended = attn.to_out[1](attn.to_out[0](output.flatten(2).to(concepts.dtype)))
            return concepts + gate * (attended + block.ff(normed))

        return update

    def _image_tokens(self, attn: nn.Module, text_len: int, rotary: Any) -> tuple[torch.Tensor, ...]:
        """Image (and reference) keys after qk-norm and RoPE, values and pre-projection outputs, (B, N, H, D)."""
        key, value, output = self.captured()  # rows of the joint [text, image, reference] sequence
        key = key[:, text_len:]
        if rotary is not None:
            key = _rotated(key, tuple(table[text_len:] for table in rotary))
        value, output = (t[:, text_len:].unflatten(-1, (attn.heads, -1)) for t in (value, output))
        return key.to(value.dtype), value, output


class _TextEncoding:
    """The modular pipeline's prompt encoding (its ``Flux3TextEncoderStep``) behind the interface ``own_rows`` reads:
    ``text_encoder``, ``tokenizer`` (for the pad id), ``_execution_device`` and ``encode_prompt``."""

    def __init__(self, pipeline: Any, max_sequence_length: int | None) -> None:
        from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

        step = _find_block(pipeline, Flux3TextEncoderStep) or Flux3TextEncoderStep()
        defaults = {param.name: param.default for param in step.inputs}
        self.encode = step._get_qwen3_vl_prompt_embeds
        self.options = {"pad_multiple": step.pad_multiple,
                        "hidden_states_layers": tuple(defaults.get("text_encoder_out_layers") or ()),
                        "max_sequence_length": int(max_sequence_length or defaults.get("max_sequence_length") or 8192)}
        self.text_encoder, self.processor = pipeline.text_encoder, pipeline.tokenizer
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._execution_device = pipeline._execution_device

    def encode_prompt(self, prompt: Sequence[str], device: Any) -> tuple[torch.Tensor]:
        (text,) = prompt
        return (self.encode(self.text_encoder, self.processor, text, device=device, **self.options),)


def _find_block(pipeline: Any, kind: type) -> Any:
    """The first block of type ``kind`` in a modular pipeline's (nested) blocks, or None."""
    pending = [getattr(pipeline, "blocks", None)]
    while pending:
        block = pending.pop(0)
        if isinstance(block, kind):
            return block
        pending += list(getattr(block, "sub_blocks", {}).values()) if block is not None else []
    return None


@register_adapter
class Flux3Adapter(ModelAdapter):
    """FLUX.3 (``Flux3Transformer2DModel``): per-mode blocks, then joint single blocks with per-mode modulation."""

    family = "flux3"
    transformer_class_names = ("Flux3Transformer2DModel",)

    default_concept_modulation = "prompt"
    """Text modulation never depends on the prompt, so both choices agree."""
    _encoded_positions: list[torch.Tensor] | None = None
    """Text positions of the encoded concepts' rows (set by :meth:`encode_concepts`)."""

    @property
    def dual_blocks(self) -> Sequence[nn.Module]:
        """The joint blocks: text and image attend to each other (shared weights, text modulated as text)."""
        return self.transformer.single_transformer_blocks

    # ------------------------------------------------------------------ concepts
    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        if getattr(pipeline, "text_encoder", None) is None or getattr(pipeline, "tokenizer", None) is None:
            raise TypeError(f"{type(pipeline).__name__} has no FLUX.3 prompt encoder (text_encoder/tokenizer); "
                            "pass concept_embeds=[...] to encode concepts yourself")
        encoding = _TextEncoding(pipeline, max_sequence_length)
        embeds, self._encoded_positions = own_rows(encoding, concepts, "FLUX.3", 0)
        return embeds

    def pipeline_cfg(self, pipeline: Any, call_arguments: inspect.BoundArguments) -> str:
        """The guider calls the transformer for the prompt first, then for the negative prompt, unnamed."""
        return "sequential"

    # ------------------------------------------------------------------ real images
    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        return latent_size_rule(pipeline, 2)  # 2×2 latent patches packed into one token

    def explain_inputs(self, request: ExplainRequest) -> dict[str, Any]:
        from diffusers.modular_pipelines import PipelineState
        from diffusers.modular_pipelines.flux3.before_denoise import (
            Flux3PrepareLatentsStep, Flux3TextRoPEInputsStep, _prepare_image_ids,
        )
        from diffusers.modular_pipelines.flux3.encoders import Flux3VaeEncoderStep

        pipeline, transformer = request.pipeline, self.transformer
        state = PipelineState()
        state.set("condition_images", [request.pixels])
        _, state = Flux3VaeEncoderStep()(pipeline, state)
        noised = flow_noised(state.get("image_cond_latents")[0].to(transformer.dtype), request, self)
        scale = getattr(_find_block(pipeline, Flux3PrepareLatentsStep), "image_rope_scale", 0.5)
        with torch.no_grad():
            (prompt,) = _TextEncoding(pipeline, request.max_sequence_length).encode_prompt([request.prompt],
                                                                                          transformer.device)
        text_ids = Flux3TextRoPEInputsStep._prepare_text_ids(prompt)
        timestep = full_timestep(request, self)
        inputs = {"hidden_states": noised.flatten(2).transpose(1, 2),
                  "encoder_hidden_states": prompt.to(transformer.dtype).expand(noised.shape[0], -1, -1),
                  "timestep": timestep, "img_ids": _prepare_image_ids(*noised.shape[-2:], scale).to(transformer.device),
                  "txt_ids": text_ids.to(transformer.device), "return_dict": False}
        if transformer.config.flow_map:
            inputs["target_timestep"] = timestep
        return inputs

    # ------------------------------------------------------------------ calls
    def begin_call(self, bound: inspect.BoundArguments, call: CallState) -> None:
        hidden, ids = bound.arguments.get("hidden_states"), bound.arguments.get("img_ids")
        if hidden is None or ids is None:
            raise ValueError("Flux3Transformer2DModel was called without hidden_states or img_ids")
        ids = ids[0] if ids.dim() == 3 else ids
        rows, cols = (int(torch.unique(ids[:, axis]).numel()) for axis in (1, 2))
        if rows * cols != hidden.shape[1]:
            raise ValueError(f"cannot read an image grid from img_ids: {hidden.shape[1]} tokens, rows×cols = "
                             f"{rows}×{cols}")
        call.batch_size, call.grid, call.num_map_tokens = hidden.shape[0], (rows, cols), rows * cols
        call.timestep = timestep_value(bound.arguments.get("timestep"))
        call.concept_rotary = self._concept_rotary(ids)

    def _concept_rotary(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``(cos, sin)`` of every concept row at ``(0, 0, 0, l)``, ``l`` its text position."""
        assert self.recorder is not None
        sizes = [int(size) for size in self.recorder.concept_sizes]
        known = self._encoded_positions
        if known is not None and [int(p.numel()) for p in known] == sizes:
            positions = torch.cat(known)
        else:
            positions = torch.cat([torch.arange(size) for size in sizes])
        concept_ids = torch.zeros(positions.numel(), ids.shape[-1], dtype=ids.dtype, device=ids.device)
        concept_ids[:, -1] = positions.to(device=ids.device, dtype=ids.dtype)
        return self.transformer.pos_embed(concept_ids)

    def _on_text_modulation(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """``single_stream_modulations["txt"]``: the text rows' shift/scale/gate in the joint blocks, one row each."""
        call = self.current_call
        if call is not None:
            call.modulation = output

    def _on_text_mode_block(self, block: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """After a text-mode block ``block(text, modulation, rotary)``: each concept's rows through it alone."""
        call = self.current_call
        if call is None or call.concepts is None or self.recorder is None:
            return
        sizes = [int(size) for size in self.recorder.concept_sizes]
        modulation = args[1][:, :1]
        cos, sin = call.concept_rotary
        parts = zip(call.concepts.split(sizes, dim=1), cos.split(sizes), sin.split(sizes))
        with torch.no_grad():
            call.concepts = torch.cat([block.forward(rows, modulation, (c, s)) for rows, c, s in parts], dim=1)

    # ------------------------------------------------------------------ install
    def install(self, recorder: Recorder, blocks: Sequence[int]) -> None:
        self.attach(recorder)
        self.wrap_processors(blocks, "attn", _known_processor_classes(),
                             lambda original, block, index: Flux3ConceptProcessor(original, block, index, recorder))
        hooks = [(self.transformer.single_stream_modulations["txt"], self._on_text_modulation)]
        hooks += [(block, self._on_text_mode_block) for block in self.transformer.txt_mode_blocks]
        for module, hook in hooks:
            self.on_undo(module.register_forward_hook(hook).remove)
