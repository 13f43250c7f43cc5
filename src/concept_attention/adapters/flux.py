"""FLUX.1 adapter (``FluxTransformer2DModel``): dual-stream blocks, T5 concepts, zero text RoPE.

Per dual block the concept rows are updated with the block's *text* weights: ``norm1_context``
(AdaLN-Zero modulation), ``add_q/k/v_proj``, ``norm_added_q/k``, ``to_add_out``, the gates,
``norm2_context`` and ``ff_context``. Concept queries attend to ``[image keys; concept keys]``.
Text positions in FLUX.1 are all zero, so text RoPE is the identity and concepts get none.

The image path is never re-implemented: the concept processor calls the block's original
processor and reads what it needs (image keys after qk-norm, image values, the image attention
output before ``to_out``) through forward hooks on the attention's own sub-modules.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from .base import ModelAdapter, register_adapter
from .wrapping import WrappingProcessor

if TYPE_CHECKING:  # pragma: no cover
    from ..core.session import CallState, ConceptAttention


def _known_processor_classes() -> tuple[type, ...]:
    from diffusers.models.transformers import transformer_flux

    names = ("FluxAttnProcessor", "FluxAttnProcessor2_0")
    return tuple(getattr(transformer_flux, n) for n in names if hasattr(transformer_flux, n))


class FluxConceptProcessor(WrappingProcessor):
    """Wraps a block's original Flux attention processor and runs the concept stream beside it.

    Returns exactly what the original processor returns; all concept state lives on the session.
    """

    # diffusers filters attention kwargs by this signature: keep it identical to FluxAttnProcessor.
    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        return self._run(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, {})

    def _concept_step(self, attn: nn.Module, call: "CallState", text_len: int, rotary: Any,
                      extra: dict[str, Any]) -> None:
        block, session = self.block, self.session
        head_dim = attn.head_dim
        image_key, image_value, image_output = self.image_activations(attn, text_len, rotary)

        concepts = call.concepts
        temb = call.extras["concept_temb"]
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(concepts, emb=temb)
        query = attn.norm_added_q(attn.add_q_proj(normed).unflatten(-1, (-1, head_dim)))
        key = attn.norm_added_k(attn.add_k_proj(normed).unflatten(-1, (-1, head_dim)))
        value = attn.add_v_proj(normed).unflatten(-1, (-1, head_dim))
        concept_output = session.attend_and_record(
            self.block_index, query, key, value, image_key, image_value, image_output
        )
        if self.block_index >= session.last_layer:
            return  # no later block reads the concept rows: skip their update
        # Residual update of the concept rows with the block's text-stream weights.
        attended = attn.to_add_out(concept_output.flatten(2).to(concepts.dtype))
        concepts = concepts + gate_msa.unsqueeze(1) * attended
        normed = block.norm2_context(concepts) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        concepts = concepts + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        if concepts.dtype == torch.float16:
            concepts = concepts.clip(-65504, 65504)
        call.concepts = concepts


@register_adapter
class FluxAdapter(ModelAdapter):
    """FLUX.1 dev / schnell / Kontext and other ``FluxTransformer2DModel`` checkpoints."""

    family = "flux"
    transformer_class_names = ("FluxTransformer2DModel",)

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__(transformer)
        self._concept_rows: torch.Tensor | None = None
        self._session: "ConceptAttention | None" = None

    @property
    def dual_blocks(self) -> Sequence[nn.Module]:
        return self.transformer.transformer_blocks

    @property
    def concept_embed_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    # ------------------------------------------------------------------ concepts
    def encode_concepts(
        self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
    ) -> list[torch.Tensor]:
        tokenizer = getattr(pipeline, "tokenizer_2", None)
        encoder = getattr(pipeline, "text_encoder_2", None)
        if tokenizer is None or encoder is None:
            raise TypeError(
                f"{type(pipeline).__name__} has no T5 prompt encoder (tokenizer_2/text_encoder_2); "
                "pass concept_embeds=[...] to encode concepts yourself"
            )
        length = max_sequence_length or _call_default(pipeline, "max_sequence_length") or 512
        return encode_with_t5(tokenizer, encoder, concepts, int(length))

    # ------------------------------------------------------------------ real images
    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        scale = int(getattr(pipeline, "vae_scale_factor", 8))
        native = int(getattr(pipeline, "default_sample_size", 128)) * scale
        return native, scale * 2

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
        batch, channels, height, width = noised.shape
        packed = pipeline._pack_latents(noised, batch, channels, height, width)
        image_ids = pipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        length = max_sequence_length or _call_default(pipeline, "max_sequence_length") or 512
        with torch.no_grad():
            prompt_embeds, pooled, text_ids = pipeline.encode_prompt(
                prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=num_samples,
                max_sequence_length=int(length),
            )
        inputs = {
            "hidden_states": packed,
            "encoder_hidden_states": prompt_embeds.to(dtype),
            "pooled_projections": pooled.to(dtype),
            "timestep": torch.full((batch,), float(timestep), device=device, dtype=dtype),
            "img_ids": image_ids,
            "txt_ids": text_ids,
            "return_dict": False,
        }
        if transformer.config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)
        return inputs

    def _rows(self, session: "ConceptAttention", dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        rows = self._concept_rows
        if rows is None or rows.dtype != dtype or rows.device != device:
            embeds = torch.cat([e.to(device=device, dtype=dtype) for e in session.concept_embeds], dim=0)
            rows = self.transformer.context_embedder(embeds)
            self._concept_rows = rows
        return rows

    # ------------------------------------------------------------------ calls
    def begin_call(self, bound: inspect.BoundArguments, call: "CallState") -> None:
        arguments = bound.arguments
        hidden = arguments.get("hidden_states")
        img_ids = arguments.get("img_ids")
        if hidden is None or img_ids is None:
            raise ValueError("FluxTransformer2DModel was called without hidden_states or img_ids")
        ids = img_ids[0] if img_ids.dim() == 3 else img_ids
        generated = ids[:, 0] == ids[0, 0]
        count = int(generated.sum()) if bool(generated.all()) else int(generated.int().argmin())
        rows = ids[:count, 1].long()
        cols = ids[:count, 2].long()
        height = int(rows.max() - rows.min()) + 1
        width = int(cols.max() - cols.min()) + 1
        if height * width != count:
            raise ValueError(f"cannot read an image grid from img_ids: {count} tokens, rows×cols = {height}×{width}")
        call.batch_size = hidden.shape[0]
        call.grid = (height, width)
        call.num_map_tokens = count
        timestep = arguments.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
            call.timestep = float(timestep.flatten()[0])
        elif isinstance(timestep, (int, float)):
            call.timestep = float(timestep)
        rows_embedded = self._rows(self._session, hidden.dtype, hidden.device)  # type: ignore[arg-type]
        call.concepts = rows_embedded.unsqueeze(0).expand(call.batch_size, -1, -1)

    def _on_time_embedding(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        session = self._session
        call = session.current_call if session is not None else None
        if call is None:
            return
        if session.concept_modulation == "prompt":
            call.extras["concept_temb"] = output
        else:
            pooled = args[-1]
            with torch.no_grad():
                call.extras["concept_temb"] = module.forward(*args[:-1], torch.zeros_like(pooled))

    # ------------------------------------------------------------------ install
    def install(self, session: "ConceptAttention", blocks: Sequence[int]) -> None:
        self._session = session
        self._concept_rows = None
        self.wrap_processors(
            blocks, "attn", _known_processor_classes(),
            lambda original, block, index: FluxConceptProcessor(original, block, index, session),
        )
        handle = self.transformer.time_text_embed.register_forward_hook(self._on_time_embedding)
        self.on_undo(handle.remove)
        self.on_undo(self._forget_session)

    def _forget_session(self) -> None:
        self._session = None
        self._concept_rows = None


def encode_with_t5(tokenizer: Any, encoder: nn.Module, concepts: Sequence[str], length: int) -> list[torch.Tensor]:
    """Encode each concept alone, as the pipeline encodes a prompt; keep only its word pieces."""
    batch = tokenizer(
        list(concepts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    ids = batch.input_ids
    device = next(encoder.parameters()).device
    with torch.no_grad():
        hidden = encoder(ids.to(device), output_hidden_states=False)[0]
    special = set(getattr(tokenizer, "all_special_ids", []))
    mask = batch.attention_mask.bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
    result = []
    for i, name in enumerate(concepts):
        keep = [j for j in range(ids.shape[1]) if mask[i, j] and int(ids[i, j]) not in special]
        if not keep:
            raise ValueError(f"concept {name!r} has no tokens left after removing special tokens")
        result.append(hidden[i, keep].float().cpu())
    return result


def _call_default(pipeline: Any, name: str) -> Any:
    try:
        parameter = inspect.signature(type(pipeline).__call__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default
