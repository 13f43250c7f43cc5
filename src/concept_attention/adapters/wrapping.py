"""The processor wrapper shared by FLUX-style attentions (FLUX.1, Chroma, FLUX.2).

The wrapper calls the block's original processor unchanged (so its outputs are exactly the
original ones) and reads what the concept stream needs through forward hooks on the attention's own
sub-modules: image keys after qk-norm (``norm_k``), image values (``to_v`` or the fused ``to_qkv``)
and the image attention output before the output projection (input of ``to_out[0]``). Subclasses
implement ``_concept_step``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..core.session import CallState, ConceptAttention


class Capture:
    """Collects the original processor's intermediate tensors through sub-module hooks."""

    def __init__(self) -> None:
        self.enabled = False
        self.image_key: torch.Tensor | None = None
        self.image_value: torch.Tensor | None = None
        self.image_output: torch.Tensor | None = None

    def clear(self) -> None:
        self.image_key = self.image_value = self.image_output = None

    def on_norm_k(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.enabled:
            self.image_key = output

    def on_to_v(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.enabled:
            self.image_value = output

    def on_to_qkv(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.enabled:
            self.image_value = output.chunk(3, dim=-1)[2]

    def on_to_out(self, module: nn.Module, args: tuple) -> None:
        if self.enabled:
            self.image_output = args[0]


class WrappingProcessor:
    """Base of the FLUX-style concept processors; all concept state lives on the session."""

    family_label = "FLUX"

    def __init__(self, inner: Any, block: nn.Module, block_index: int, session: "ConceptAttention") -> None:
        self.inner = inner
        self.block = block
        self.block_index = block_index
        self.session = session
        self.capture = Capture()
        self._qkv_hooked: nn.Module | None = None
        self._handles: list[Any] = []

    def _run(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        image_rotary_emb: Any,
        extra: dict[str, Any],
    ) -> Any:
        call = self.session.current_call
        if call is None or encoder_hidden_states is None or call.concepts is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **extra)
        self._hook_fused_projection(attn)
        self.capture.enabled = True
        try:
            outputs = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **extra)
        finally:
            self.capture.enabled = False
        try:
            with torch.no_grad():
                self._concept_step(attn, call, encoder_hidden_states.shape[1], image_rotary_emb, extra)
        finally:
            self.capture.clear()
        return outputs

    def _concept_step(self, attn: nn.Module, call: "CallState", text_len: int, rotary: Any,
                      extra: dict[str, Any]) -> None:
        raise NotImplementedError

    def image_activations(self, attn: nn.Module, text_len: int, rotary: Any) -> tuple[torch.Tensor, ...]:
        """Image keys (rotated like the original's), values and pre-projection outputs, (B, N, H, D)."""
        capture = self.capture
        if capture.image_key is None or capture.image_value is None or capture.image_output is None:
            raise RuntimeError(
                f"the {self.family_label} attention processor did not expose image keys/values/outputs as "
                f"expected; this diffusers version is not supported by the {self.family_label} adapter"
            )
        head_dim = attn.head_dim
        image_key = capture.image_key
        if rotary is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            cos, sin = rotary
            image_key = apply_rotary_emb(image_key, (cos[text_len:], sin[text_len:]), sequence_dim=1)
        image_value = capture.image_value.unflatten(-1, (-1, head_dim))
        image_output = capture.image_output.unflatten(-1, (-1, head_dim))
        return image_key, image_value, image_output

    def hook(self, attn: nn.Module) -> None:
        self._handles += [
            attn.norm_k.register_forward_hook(self.capture.on_norm_k),
            attn.to_v.register_forward_hook(self.capture.on_to_v),
            attn.to_out[0].register_forward_pre_hook(self.capture.on_to_out),
        ]

    def unhook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._qkv_hooked = None

    def _hook_fused_projection(self, attn: nn.Module) -> None:
        fused = getattr(attn, "to_qkv", None) if getattr(attn, "fused_projections", False) else None
        if fused is not None and fused is not self._qkv_hooked:
            self._handles.append(fused.register_forward_hook(self.capture.on_to_qkv))
            self._qkv_hooked = fused
