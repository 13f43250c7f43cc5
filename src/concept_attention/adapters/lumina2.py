"""Lumina 2 adapter (``Lumina2Transformer2DModel``, ``Lumina2Pipeline``): a single-stream model.

**Is a concept stream defined?** Lumina 2's main ``layers`` run text and image as one sequence with one
set of weights *and* one modulation: a text token is processed exactly as an image token is (there is no
text-only weight to reuse, and nothing to choose). So the concept stream is fully determined by how the
model processes a prompt token: a concept row goes through every operation a prompt row goes through, and
only the attention pattern is the method's (concept queries see ``[image keys; concept keys]``; no image or
prompt token sees a concept). Nothing of the image path is re-implemented or changed. (Families with
dual-stream blocks leave their single-stream blocks out; a model made only of them would give no map at all,
and here the concept stream is as fully determined as in a dual block.)

Before the main layers the prompt passes a text-only ``context_refiner`` (unmodulated, text attends to text);
the concepts pass it **each alone**, as if each concept were the prompt. Maps come from the main ``layers``
(all of them joint; ``dual_blocks`` here); default: the deeper half. The image-only ``noise_refiner`` gives
none.

**Per layer** a concept row is ``norm1``-ed (RMSNorm, ``1 + scale_msa``), projected by the shared
``to_q/to_k/to_v`` (grouped-query: keys and values have ``kv_heads`` heads, repeated as the model repeats
them), qk-normed and rotated at its text position; after the attention it is updated as the layer updates
every row: ``+ tanh(gate_msa) · norm2(to_out(o_c))``, then ``+ tanh(gate_mlp) · ffn_norm2(ff(ffn_norm1(·) ·
(1 + scale_mlp)))``.

**Modulation.** The ``temb`` is the timestep embedding only (no pooled text): ``concept_modulation``
``"zero"`` and ``"prompt"`` coincide.

**Positions (RoPE).** Caption token ``i`` sits at ``(i, 0, 0)``, the image at ``(caption length, row,
col)``. A concept row keeps the index its token has when the concept is encoded alone (after the
pipeline's system prompt and ``<Prompt Start>``); concepts given as ``concept_embeds`` get ``0..n-1``.

**Concepts** are encoded one at a time by the pipeline's ``encode_prompt`` (Gemma, second-to-last hidden
layer, the system prompt before the text); a concept's rows are its own tokens, those after the prefix it
shares with the empty prompt (padding removed), read from the token ids the encoder saw.

**Layout.** Each sample's joint sequence is ``[its caption (its own length), image]``, padded to the
longest: the image rows are found per sample from the attention mask. **CFG:** ``Lumina2Pipeline`` calls
the transformer for the prompt, then for the negative prompt, unnamed: layout ``"sequential"``.

**Fused QKV.** ``Lumina2AttnProcessor2_0`` always uses ``to_q/to_k/to_v``; fusing an attention by hand
leaves outputs and maps unchanged.

**Real images:** VAE latents (shift and scale) noised by flow matching at noise level ``t``; Lumina's
transformer counts time the other way (``timestep = 1 - t``, 1 = clean image), and maps record ``t``.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..core.contract import CallState, ExplainRequest, ModelAdapter, Recorder, register_adapter
from .common import flow_noised, full_timestep, latent_size_rule, timestep_value, vae_latents
from .encoding import own_rows, sequence_length
from .wrapping import Update, WrappingProcessor


def rotated(rows: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``rows`` (B, S, H, D) rotated by complex RoPE ``freqs`` (B or 1, S, D/2), as Lumina and Z-Image rotate."""
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(rows, freqs, use_real=False).type_as(rows)


def all_heads(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query keys or values (B, S, kv, D) repeated to ``heads`` heads, as the attention repeats them."""
    return rows.repeat_interleave(heads // rows.shape[2], dim=2)


def shared_projections(attn: nn.Module, rows: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concept queries, keys (qk-normed, rotated) and values from the weights text and image share, (B, r, H, D)."""
    head_dim = attn.to_q.out_features // attn.heads
    query, key, value = (proj(rows).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    query, key = (rows if norm is None else norm(rows) for norm, rows in ((attn.norm_q, query), (attn.norm_k, key)))
    return rotated(query, freqs), all_heads(rotated(key, freqs), attn.heads), all_heads(value, attn.heads)


def image_rows(attn: nn.Module, captured: tuple[torch.Tensor, ...], freqs: torch.Tensor, starts: Sequence[int],
               count: int) -> tuple[torch.Tensor, ...]:
    """Each sample's ``count`` image rows from ``starts[i]`` on: keys (after qk-norm, rotated), values, outputs."""
    key, value, output = (torch.stack([t[i, s:s + count] for i, s in enumerate(starts)]) for t in captured)
    table = torch.stack([freqs[i, s:s + count] for i, s in enumerate(starts)])
    head_dim = output.shape[-1] // attn.heads
    key = all_heads(rotated(key, table), attn.heads)
    return key, all_heads(value.unflatten(-1, (-1, head_dim)), attn.heads), output.unflatten(-1, (attn.heads, -1))


def residual_update(concepts: torch.Tensor, attended: torch.Tensor, gates: tuple[torch.Tensor, torch.Tensor],
                    scale_mlp: torch.Tensor, norms: tuple[nn.Module, nn.Module, nn.Module],
                    feed_forward: nn.Module) -> torch.Tensor:
    """``+ tanh(gate_msa)·norm2(attended)``, then ``+ tanh(gate_mlp)·ffn_norm2(ff(ffn_norm1(·)·(1 + scale_mlp)))``
    for ``norms = (norm2, ffn_norm1, ffn_norm2)`` (Lumina 2 and Z-Image layers; scales and gates per sample)."""
    gate_msa, gate_mlp = (gate.tanh()[:, None] for gate in gates)
    norm2, ffn_norm1, ffn_norm2 = norms
    concepts = concepts + gate_msa * norm2(attended.to(concepts.dtype))
    return concepts + gate_mlp * ffn_norm2(feed_forward(ffn_norm1(concepts) * (1 + scale_mlp[:, None])))


class Lumina2ConceptProcessor(WrappingProcessor):
    """Wraps a main layer's original ``Lumina2AttnProcessor2_0`` and runs the concept stream beside it."""

    family_label = "Lumina 2"

    # diffusers filters attention kwargs by this signature: keep it identical to Lumina2AttnProcessor2_0.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None,
                 base_sequence_length: int | None = None) -> Any:
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                         base_sequence_length)

    def _concept_step(self, attn: nn.Module, call: CallState, text_len: int, attention_mask: Any, rotary: Any,
                      base_sequence_length: Any) -> Update:
        block, concepts = self.block, call.concepts
        normed, gate_msa, scale_mlp, gate_mlp = block.norm1(concepts, call.modulation)
        query, key, value = shared_projections(attn, normed, call.concept_rotary)
        lengths = [text_len] * concepts.shape[0] if attention_mask is None else attention_mask.sum(1).tolist()
        starts = [int(length) - call.num_map_tokens for length in lengths]  # [caption, image] per sample
        image = image_rows(attn, self.captured(), rotary, starts, call.num_map_tokens)
        output = self.recorder.attend_and_record(self.slot, query, key, value, *image)
        return lambda: residual_update(
            concepts, attn.to_out[1](attn.to_out[0](output.flatten(2).to(concepts.dtype))), (gate_msa, gate_mlp),
            scale_mlp, (block.norm2, block.ffn_norm1, block.ffn_norm2), block.feed_forward)


class SharedWeightsStream(ModelAdapter):
    """What Lumina 2 and Z-Image share: main layers as the mapped blocks, concepts through the text-only context
    refiner one at a time, their text positions, the processor wrapping."""

    attention: ClassVar[str] = "attn"
    processor_class: ClassVar[type[WrappingProcessor]] = Lumina2ConceptProcessor
    processor_names: ClassVar[tuple[str, str]] = ("transformer_lumina2", "Lumina2AttnProcessor2_0")
    """(module in ``diffusers.models.transformers``, class) of the main layers' attention processor."""
    default_concept_modulation = "prompt"
    """The modulation holds no text, so both choices agree."""
    _encoded_positions: list[torch.Tensor] | None = None
    """Caption positions of the encoded concepts' rows (set when concepts are encoded)."""

    default_sequence_length: ClassVar[int] = 256
    """The pipeline's ``max_sequence_length`` when neither the call nor the pipeline sets one."""

    @property
    def dual_blocks(self) -> Sequence[nn.Module]:
        """The main layers: text and image in one sequence (every one of them joint)."""
        return self.transformer.layers

    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        """Each concept alone through the pipeline's ``encode_prompt`` (no guidance): its own rows and positions."""
        length = sequence_length(pipeline, max_sequence_length, self.default_sequence_length)
        embeds, self._encoded_positions = own_rows(pipeline, concepts, self.family, 0, do_classifier_free_guidance=False,
                                                   max_sequence_length=length)
        return embeds

    @property
    def concept_embed_dim(self) -> int:
        """Width of the caption features (``cap_feat_dim``)."""
        return int(self.transformer.config.cap_feat_dim)

    def concept_positions(self) -> torch.Tensor:
        """Caption index of every concept row: its index when encoded alone, else ``0..n-1`` per concept."""
        assert self.recorder is not None
        sizes = [int(size) for size in self.recorder.concept_sizes]
        known = self._encoded_positions
        if known is not None and [int(p.numel()) for p in known] == sizes:
            return torch.cat(known).long()
        return torch.cat([torch.arange(size) for size in sizes])

    def _on_context_refiner(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """After a context-refiner layer ``layer(text, mask, freqs)``: each concept's rows through it alone."""
        call = self.current_call
        if call is None or call.concepts is None or self.recorder is None:
            return
        sizes = [int(size) for size in self.recorder.concept_sizes]
        parts = zip(call.concepts.split(sizes, dim=1), call.concept_rotary.split(sizes, dim=1))
        with torch.no_grad():
            call.concepts = torch.cat([layer.forward(rows, None, freqs) for rows, freqs in parts], dim=1)

    def _on_time_embedding(self, module: nn.Module, args: tuple, output: Any) -> None:
        call = self.current_call
        if call is not None:
            call.modulation = output[0] if isinstance(output, tuple) else output

    def install(self, recorder: Recorder, blocks: Sequence[int]) -> None:
        import importlib

        module, name = self.processor_names
        known = getattr(importlib.import_module(f"diffusers.models.transformers.{module}"), name, None)
        kind = self.processor_class
        self.attach(recorder)
        self.wrap_processors(blocks, self.attention, (known,) if known is not None else (),
                             lambda original, block, index: kind(original, block, index, recorder))
        hooks = [(layer, self._on_context_refiner) for layer in self.transformer.context_refiner]
        hooks.append((self.time_embedding(), self._on_time_embedding))
        for hooked, hook in hooks:
            self.on_undo(hooked.register_forward_hook(hook).remove)

    def time_embedding(self) -> nn.Module:
        """The module whose output (or its first part) is the main layers' modulation input."""
        raise NotImplementedError


@register_adapter
class Lumina2Adapter(SharedWeightsStream):
    """Lumina-Image 2.0 (``Lumina2Transformer2DModel``)."""

    family = "lumina2"
    transformer_class_names = ("Lumina2Transformer2DModel",)

    def embed_concepts(self, embeds: torch.Tensor) -> torch.Tensor:
        """``caption_embedder`` (RMSNorm, Linear), the path the prompt takes in."""
        return self.transformer.time_caption_embed.caption_embedder(embeds)

    def time_embedding(self) -> nn.Module:
        return self.transformer.time_caption_embed  # returns (temb, caption embedding)

    def pipeline_cfg(self, pipeline: Any, call_arguments: inspect.BoundArguments) -> str:
        """The prompt's call first, then (with guidance, before the truncation step) the negative prompt's."""
        return "sequential"

    # ------------------------------------------------------------------ calls
    def begin_call(self, bound: inspect.BoundArguments, call: CallState) -> None:
        hidden = bound.arguments.get("hidden_states")
        if hidden is None or hidden.dim() != 4:
            raise ValueError("Lumina2Transformer2DModel was called without a (batch, channels, height, width) latent")
        patch = int(self.transformer.config.patch_size)
        rows, cols = hidden.shape[2] // patch, hidden.shape[3] // patch
        call.batch_size, call.grid, call.num_map_tokens = hidden.shape[0], (rows, cols), rows * cols
        timestep = timestep_value(bound.arguments.get("timestep"))
        call.timestep = None if timestep is None else 1.0 - timestep  # Lumina's time runs from noise (0) to image
        positions = self.concept_positions().to(hidden.device)
        ids = torch.zeros(1, positions.numel(), 3, dtype=torch.int32, device=hidden.device)
        ids[0, :, 0] = positions.to(torch.int32)
        call.concept_rotary = self.transformer.rope_embedder._get_freqs_cis(ids)  # (1, rows, head_dim / 2)

    # ------------------------------------------------------------------ real images
    def explain_inputs(self, request: ExplainRequest) -> dict[str, Any]:
        pipeline, transformer = request.pipeline, self.transformer
        noised = flow_noised(vae_latents(request, self), request, self)
        with torch.no_grad():
            embeds, mask, *_ = pipeline.encode_prompt(
                request.prompt, do_classifier_free_guidance=False, num_images_per_prompt=request.num_samples,
                device=transformer.device,
                max_sequence_length=sequence_length(pipeline, request.max_sequence_length, 256))
        return {"hidden_states": noised, "timestep": 1.0 - full_timestep(request, self),
                "encoder_hidden_states": embeds.to(transformer.dtype), "encoder_attention_mask": mask,
                "return_dict": False}

    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        """(the pipeline's default size, VAE scale × patch) in pixels."""
        return latent_size_rule(pipeline, int(self.transformer.config.patch_size))
