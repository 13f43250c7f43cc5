"""FLUX.2 adapter (``Flux2Transformer2DModel``: FLUX.2 dev and the Klein variants).

Per dual block the concept rows are updated with the block's *text* weights: ``norm1_context``
(plain LayerNorm) with the model's global text modulation (``double_stream_modulation_txt``,
split into shift/scale/gate for attention and feed-forward), ``add_q/k/v_proj``,
``norm_added_q/k``, RoPE, ``to_add_out``, ``norm2_context`` and the SwiGLU ``ff_context``.
Concept queries attend to ``[image keys; concept keys]``.

Maps come from the dual-stream blocks only (8 in the released checkpoints; the single-stream
blocks have no separate text weights). Default: the deeper half of the dual blocks (4–7).

**Concept positions (RoPE).** FLUX.2 text tokens are rotated along the 4th RoPE axis with
``l = 0, 1, 2, ...`` (their index in the padded, chat-templated encoder sequence), so a concept
row needs a position. :attr:`Flux2Adapter.concept_positions` chooses it:

- ``"own"`` (default): each concept token keeps the position it has when the concept is encoded
  alone through the pipeline's chat template (its index inside that template). With
  ``concept_embeds`` given by the user (positions unknown), a concept's tokens get ``0..n-1``.
- ``"zero"``: every concept row at ``l = 0`` (RoPE is then the identity for concepts).
- an ``int``: every concept row at that position.

Set it before entering the session: ``ca = ConceptAttention(pipe, concepts);
ca.adapter.concept_positions = "zero"; with ca: ...``.

**Concept encoding.** Concepts go through the pipeline's own ``encode_prompt`` (chat template +
stacked hidden states of several encoder layers). The concept's token span inside the template is
found by comparing its token ids with those of the empty prompt (common prefix and suffix are
template). The token ids are read from the text encoder's input with a pre-hook, so the
pipeline's tokenisation is never re-implemented.

**Modulation.** FLUX.2 has no pooled text vector: the modulation depends on timestep (and
guidance) only, so ``concept_modulation="zero"`` and ``"prompt"`` are the same here.

**Real images** (:func:`concept_attention.explain`): the image is encoded as the pipeline encodes
reference images (``_encode_vae_image``: VAE, 2×2 patchify, batch-norm statistics), noised by flow
matching at ``t`` and run with the prompt (guidance 4.0 for guidance-distilled checkpoints).

**Reference images.** Maps cover only the generated image's tokens (position ids with ``t = 0``;
reference images have ``t = 10, 20, ...``); concepts attend to reference-image keys too. This holds
for reference tokens in the sequence (``Flux2Pipeline``, ``Flux2KleinPipeline``) and for Klein's
KV-cache mode (``Flux2KleinKVPipeline``): in its ``"extract"`` step the reference tokens come first
and are moved behind the generated ones for scoring; in ``"cached"`` steps the cached reference
keys/values of each block are appended to the image keys/values the concepts attend to.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import nn

from ..core.contract import CallState, ExplainRequest, ModelAdapter, Recorder, register_adapter
from .common import flow_noised, full_timestep, grid_from_ids, latent_size_rule, latents_and_image_ids, timestep_value
from .encoding import call_default, concept_token_span, sequence_length
from .wrapping import FluxStyleProcessor, Update, modulated, text_stream_update

CONCEPT_POSITION_POLICIES = ("own", "zero")


def _known_processor_classes() -> tuple[type, ...]:
    from diffusers.models.transformers import transformer_flux2

    names = ("Flux2AttnProcessor", "Flux2KVAttnProcessor")
    return tuple(getattr(transformer_flux2, n) for n in names if hasattr(transformer_flux2, n))


class Flux2ConceptProcessor(FluxStyleProcessor):
    """Wraps a dual block's original FLUX.2 processor and runs the concept stream beside it.

    Returns exactly what the original processor returns; all concept state lives on the session.
    """

    family_label = "FLUX.2"

    # diffusers filters attention kwargs by this signature: keep it identical to Flux2AttnProcessor.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def _concept_step(self, attn: nn.Module, call: CallState, text_len: int, attention_mask: Any, rotary: Any,
                      **extra: Any) -> Update:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

        block, concepts = self.block, call.concepts
        image_key, image_value, image_output = self._image_tokens(attn, call, text_len, rotary, extra)
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = Flux2Modulation.split(call.modulation, 2)
        query, key, value = self.text_projections(attn, (1 + scale_msa) * block.norm1_context(concepts) + shift_msa)
        if rotary is not None and call.concept_rotary is not None:
            query = apply_rotary_emb(query, call.concept_rotary, sequence_dim=1)
            key = apply_rotary_emb(key, call.concept_rotary, sequence_dim=1)
        output = self.recorder.attend_and_record(self.slot, query, key, value, image_key, image_value,
                                                 image_output)
        return lambda: text_stream_update(
            concepts, attn.to_add_out(output.flatten(2).to(concepts.dtype)), gate_msa,
            modulated(block.norm2_context, shift_mlp, scale_mlp), gate_mlp, block.ff_context)

    def _image_tokens(self, attn: nn.Module, call: CallState, text_len: int, rotary: Any, extra: dict
                      ) -> tuple[torch.Tensor, ...]:
        """Image keys/values/outputs with the generated tokens first, plus cached reference keys/values."""
        image_key, image_value, image_output = self.image_activations(attn, text_len, rotary)
        offset = call.map_offset
        if offset:  # reference tokens before the generated ones (KV extract step): generated first
            image_key, image_value, image_output = (
                torch.cat([t[:, offset:], t[:, :offset]], dim=1) for t in (image_key, image_value, image_output))
        cache = extra.get("kv_cache")
        if extra.get("kv_cache_mode") == "cached" and cache is not None:  # cached reference keys/values
            cached_key, cached_value = cache.get()
            image_key = torch.cat([image_key, cached_key.to(image_key.dtype)], dim=1)
            image_value = torch.cat([image_value, cached_value.to(image_value.dtype)], dim=1)
        return image_key, image_value, image_output


class Flux2KVConceptProcessor(Flux2ConceptProcessor):
    """The same wrapper for ``Flux2KVAttnProcessor`` (Klein KV pipelines), keeping its signature."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,  # type: ignore[override]
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None, kv_cache: Any = None, kv_cache_mode: str | None = None,
                 num_ref_tokens: int = 0) -> Any:
        return self._run(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
            kv_cache=kv_cache, kv_cache_mode=kv_cache_mode, num_ref_tokens=num_ref_tokens,
        )


@register_adapter
class Flux2Adapter(ModelAdapter):
    """FLUX.2 dev / Klein (``Flux2Transformer2DModel``)."""

    family = "flux2"
    transformer_class_names = ("Flux2Transformer2DModel",)

    default_concept_modulation = "prompt"
    """No pooled text vector exists: modulation depends on the timestep only, so both choices agree."""

    concept_positions: str | int = "own"
    """RoPE text position of concept rows: ``"own"`` (default), ``"zero"`` or an int (module docstring)."""

    def __init__(self, transformer: nn.Module, concept_positions: str | int | None = None) -> None:
        super().__init__(transformer)
        if concept_positions is not None:
            self.concept_positions = concept_positions
        self._encoded_positions: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ concepts
    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        encoder = getattr(pipeline, "text_encoder", None)
        if encoder is None or not hasattr(pipeline, "encode_prompt"):
            raise TypeError(
                f"{type(pipeline).__name__} has no FLUX.2 prompt encoder (text_encoder/encode_prompt); "
                "pass concept_embeds=[...] to encode concepts yourself"
            )
        length = sequence_length(pipeline, max_sequence_length, 512)
        calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            calls.append((ids, kwargs.get("attention_mask")))

        handle = encoder.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                embeds, _ = pipeline.encode_prompt(
                    prompt=[*concepts, ""], device=pipeline._execution_device, max_sequence_length=length
                )
        finally:
            handle.remove()
        if not calls or any(ids is None for ids, _ in calls):
            raise RuntimeError("could not read the token ids the FLUX.2 pipeline fed to its text encoder")
        ids = torch.cat([c[0].cpu() for c in calls])
        masks = [c[1].cpu() if c[1] is not None else torch.ones_like(c[0].cpu()) for c in calls]
        mask = torch.cat(masks).bool()
        if ids.shape[0] != len(concepts) + 1 or ids.shape[1] != embeds.shape[1]:
            raise RuntimeError("the FLUX.2 text encoder saw an unexpected batch; cannot locate concept tokens")
        reference = ids[-1][mask[-1]].tolist()
        result, positions = [], []
        for i, name in enumerate(concepts):
            span = concept_token_span(ids[i], mask[i], reference)
            if span.numel() == 0:
                raise ValueError(f"concept {name!r} has no tokens of its own inside the prompt template")
            result.append(embeds[i, span].float().cpu())
            positions.append(span)
        self._encoded_positions = positions
        return result

    # ------------------------------------------------------------------ real images
    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        return latent_size_rule(pipeline, 2)  # 2×2 latent patches (``_encode_vae_image`` patchifies)

    def explain_inputs(self, request: ExplainRequest) -> dict[str, Any]:
        """Flow-matching noised latents of the pixels (encoded as the pipeline encodes reference images)."""
        pipeline, transformer = request.pipeline, self.transformer
        with torch.no_grad():
            encoded = pipeline._encode_vae_image(
                request.pixels.to(device=transformer.device, dtype=pipeline.vae.dtype), request.generator)
        noised = flow_noised(encoded.to(transformer.dtype), request, self)
        with torch.no_grad():
            prompt_embeds, text_ids = pipeline.encode_prompt(
                prompt=request.prompt, device=transformer.device, num_images_per_prompt=request.num_samples,
                max_sequence_length=sequence_length(pipeline, request.max_sequence_length, 512))
        inputs = {"hidden_states": pipeline._pack_latents(noised),
                  "encoder_hidden_states": prompt_embeds.to(transformer.dtype), "timestep": full_timestep(request, self),
                  "img_ids": pipeline._prepare_latent_ids(noised).to(transformer.device), "txt_ids": text_ids,
                  "return_dict": False}
        if transformer.config.guidance_embeds:
            guidance = call_default(pipeline, "guidance_scale") or 4.0
            inputs["guidance"] = torch.full((request.num_samples,), float(guidance), device=transformer.device,
                                            dtype=torch.float32)
        return inputs

    def _positions(self, sizes: Sequence[int]) -> torch.Tensor:
        """Text positions (the RoPE ``l`` coordinate) of every concept row, concatenated."""
        policy = self.concept_positions
        total = int(sum(sizes))
        if isinstance(policy, bool) or not isinstance(policy, (str, int)):
            raise TypeError(f"concept_positions must be 'own', 'zero' or an int, not {policy!r}")
        if isinstance(policy, int):
            if policy < 0:
                raise ValueError(f"concept_positions must be non-negative, got {policy}")
            return torch.full((total,), policy, dtype=torch.long)
        if policy == "zero":
            return torch.zeros(total, dtype=torch.long)
        if policy != "own":
            raise ValueError(f"concept_positions must be one of {CONCEPT_POSITION_POLICIES} or an int, not {policy!r}")
        known = self._encoded_positions
        if known is not None and [int(p.numel()) for p in known] == list(sizes):
            return torch.cat(known).long()
        return torch.cat([torch.arange(int(n)) for n in sizes])

    # ------------------------------------------------------------------ calls
    def begin_call(self, bound: inspect.BoundArguments, call: CallState) -> None:
        hidden, ids = latents_and_image_ids(bound, self.transformer)
        # Generated latents have t = 0 in every FLUX.2 pipeline, reference images t = 10, 20, ...
        generated = ids[:, 0] == 0
        if not bool(generated.any()):
            generated = ids[:, 0] == ids[0, 0]
        where = torch.nonzero(generated).flatten()
        start, count = int(where[0]), int(where.numel())
        if int(where[-1]) - start + 1 != count:
            raise ValueError("the generated image's tokens are not contiguous in img_ids")
        call.batch_size = hidden.shape[0]
        call.grid = grid_from_ids(ids[start: start + count])
        call.num_map_tokens = count
        call.map_offset = start
        call.timestep = timestep_value(bound.arguments.get("timestep"))
        call.concept_rotary = self._concept_rotary(ids)

    def _concept_rotary(self, ids: torch.Tensor) -> Any:
        """RoPE of the concept rows at their text positions (the 4th id axis)."""
        assert self.recorder is not None
        positions = self._positions(self._sizes).to(ids.device)
        concept_ids = torch.zeros(positions.shape[0], ids.shape[-1], dtype=ids.dtype, device=ids.device)
        concept_ids[:, -1] = positions.to(ids.dtype)
        return self.transformer.pos_embed(concept_ids)

    def _on_text_modulation(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        call = self.current_call
        if call is not None:
            call.modulation = output

    # ------------------------------------------------------------------ install
    def install(self, recorder: Recorder, blocks: Sequence[int]) -> None:
        from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor

        self._sizes = tuple(int(size) for size in recorder.concept_sizes)
        self._positions(self._sizes)  # validate the policy before touching the model
        self.attach(recorder)

        def make_wrapper(original: Any, block: nn.Module, index: int) -> Flux2ConceptProcessor:
            kind = Flux2KVConceptProcessor if isinstance(original, Flux2KVAttnProcessor) else Flux2ConceptProcessor
            return kind(original, block, index, recorder)

        self.wrap_processors(blocks, "attn", _known_processor_classes(), make_wrapper)
        handle = self.transformer.double_stream_modulation_txt.register_forward_hook(self._on_text_modulation)
        self.on_undo(handle.remove)
