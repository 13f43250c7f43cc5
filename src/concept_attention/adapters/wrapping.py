"""The processor wrapper shared by every family (FLUX.1, Chroma, FLUX.2, SD3, CogVideoX).

The wrapper calls the block's original processor unchanged (so its outputs are exactly the
original ones) and reads what the concept stream needs through forward hooks on the attention's own
sub-modules: keys after qk-norm (``norm_k``), values (``to_v`` or the fused ``to_qkv``) and the
attention output before the output projection (input of ``to_out[0]``). Subclasses implement
``_concept_step`` (and ``hook`` where their attention exposes these differently);
:class:`FluxStyleProcessor` adds the image-token reading of FLUX-style attentions.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..core.contract import BlockSlot, CallState, Recorder

Update = Callable[[], torch.Tensor]
"""What a concept step returns: computes the concept rows after the block (run only if a later block needs them)."""


class Capture:
    """Collects the original processor's intermediate tensors through sub-module hooks."""

    def __init__(self) -> None:
        self.enabled = False
        self.image_key: torch.Tensor | None = None
        self.image_value: torch.Tensor | None = None
        self.image_output: torch.Tensor | None = None

    def clear(self) -> None:
        self.image_key = self.image_value = self.image_output = None

    def on_key(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.enabled:
            self.image_key = output

    def on_value(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.enabled:
            self.image_value = output

    def on_qkv(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Fused ``to_qkv``: the value third (keys still come from ``norm_k``)."""
        if self.enabled:
            self.image_value = output.chunk(3, dim=-1)[2]

    def on_output(self, module: nn.Module, args: tuple) -> None:
        if self.enabled:
            self.image_output = args[0]


class WrappingProcessor:
    """Base of the concept processors; all concept state lives on the session (the recorder)."""

    family_label: ClassVar[str] = "FLUX"
    processor_label: ClassVar[str] = "attention processor"
    captured_label: ClassVar[str] = "image keys/values/outputs"
    capture_class: ClassVar[type[Capture]] = Capture

    def __init__(self, inner: Any, block: nn.Module, block_index: int, recorder: Recorder) -> None:
        self.inner = inner
        self.block = block
        self.block_index = block_index
        self.recorder = recorder
        self.slot = recorder.block_slot(block_index) if recorder is not None else BlockSlot(block_index, False, False)
        self.capture = self.capture_class()
        self._qkv_hooked: nn.Module | None = None
        self._handles: list[Any] = []

    # diffusers configures processors through these attributes (set_attention_backend, context parallelism):
    # they belong to the original processor, which does the attention, also while it is wrapped.
    @property
    def _attention_backend(self) -> Any:
        return self._inner_attribute("_attention_backend")

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.inner._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return self._inner_attribute("_parallel_config")

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.inner._parallel_config = value

    def _inner_attribute(self, name: str) -> Any:
        try:
            return getattr(self.inner, name)
        except AttributeError:
            raise AttributeError(f"{type(self.inner).__name__} has no {name}") from None

    def _run(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
             *args: Any, **kwargs: Any) -> Any:
        """Call the original processor with exactly these arguments; then, in a mapped call, the concept step.

        ``_concept_step`` receives the prompt length and the arguments after ``encoder_hidden_states``;
        the update it returns runs only if a later block is recorded (fp16 rows clipped to the fp16 range).
        """
        call = self.recorder.current_call
        if call is None or encoder_hidden_states is None or call.concepts is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        match_batch(call, hidden_states.shape[0])
        self._hook_fused_projection(attn)
        self.capture.enabled = True
        try:
            outputs = self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            self.capture.enabled = False
        try:
            with torch.no_grad():
                update = self._concept_step(attn, call, encoder_hidden_states.shape[1], *args, **kwargs)
                if update is not None and self.slot.updates:
                    call.concepts = clip_to_dtype(update())
        finally:
            self.capture.clear()
        return outputs

    def _concept_step(self, attn: nn.Module, call: CallState, text_len: int, *args: Any, **kwargs: Any
                      ) -> Update | None:
        """Attend and record this block's concept maps; return how the concept rows continue (or None)."""
        raise NotImplementedError

    def captured(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The captured (key, value, output) of this call, or an error naming the unsupported version."""
        capture = self.capture
        if capture.image_key is None or capture.image_value is None or capture.image_output is None:
            raise RuntimeError(
                f"the {self.family_label} {self.processor_label} did not expose {self.captured_label} as "
                f"expected; this diffusers version is not supported by the {self.family_label} adapter"
            )
        return capture.image_key, capture.image_value, capture.image_output

    def hook(self, attn: nn.Module) -> None:
        self._handles += [
            attn.norm_k.register_forward_hook(self.capture.on_key),
            attn.to_v.register_forward_hook(self.capture.on_value),
            attn.to_out[0].register_forward_pre_hook(self.capture.on_output),
        ]

    def unhook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._qkv_hooked = None

    def _hook_fused_projection(self, attn: nn.Module) -> None:
        fused = getattr(attn, "to_qkv", None) if getattr(attn, "fused_projections", False) else None
        if fused is not None and fused is not self._qkv_hooked:
            self._handles.append(fused.register_forward_hook(self.capture.on_qkv))
            self._qkv_hooked = fused


class FluxStyleProcessor(WrappingProcessor):
    """FLUX-style attentions (FLUX.1, Chroma, FLUX.2): image keys normed apart from the text's."""

    def image_activations(self, attn: nn.Module, text_len: int, rotary: Any) -> tuple[torch.Tensor, ...]:
        """Image keys (rotated like the original's), values and pre-projection outputs, (B, N, H, D)."""
        image_key, image_value, image_output = self.captured()
        head_dim = attn.head_dim
        if rotary is not None:
            cos, sin = rotary
            image_key = rotate_pairs(image_key, cos[text_len:], sin[text_len:])
        image_value = image_value.unflatten(-1, (-1, head_dim))
        image_output = image_output.unflatten(-1, (-1, head_dim))
        return image_key, image_value, image_output

    @staticmethod
    def text_projections(attn: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Concept queries, keys (qk-normed) and values from the attention's text weights, (B, r, H, D)."""
        head_dim = attn.head_dim
        query = attn.norm_added_q(attn.add_q_proj(normed).unflatten(-1, (-1, head_dim)))
        key = attn.norm_added_k(attn.add_k_proj(normed).unflatten(-1, (-1, head_dim)))
        value = attn.add_v_proj(normed).unflatten(-1, (-1, head_dim))
        return query, key, value


def rotate_pairs(rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb(rows, (cos, sin), sequence_dim=1)`` for FLUX-style RoPE, as one complex product.

    ``rows`` is ``(B, S, H, D)``; ``cos``/``sin`` are ``(S, D)`` with each value repeated for the two entries of
    a pair (``repeat_interleave_real=True``, FLUX.1 and FLUX.2). Each pair ``(a, b)`` becomes
    ``(a·cos − b·sin, a·sin + b·cos)`` in fp32, the very products and sums diffusers forms, without its
    stacked and rotated copies (about 4× less memory traffic over the image keys). Under ``torch.compile`` the
    same products in real arithmetic, which inductor fuses (it generates no code for complex numbers).
    """
    cos, sin = cos[:, None, 0::2].float(), sin[:, None, 0::2].float()
    if torch.compiler.is_compiling():
        real, imaginary = rows.float().unflatten(-1, (-1, 2)).unbind(-1)
        turned = torch.stack([real * cos - imaginary * sin, real * sin + imaginary * cos], dim=-1)
        return turned.flatten(-2).to(rows.dtype)
    pairs = torch.view_as_complex(rows.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).to(rows.dtype)


def match_batch(call: CallState, rows: int) -> None:
    """Make ``call`` fit the batch the attention actually sees.

    A hook inside the transformer may run fewer rows than the call was given: FasterCache drops the
    unconditional half of a batched classifier-free-guidance call on the steps where it approximates
    it. The conditional rows are then all there is (and all that is mapped); anything else is refused.
    """
    if rows == call.batch_size:
        return
    half = call.map_rows
    if half is not None and half.stop - half.start == rows and call.concepts is not None:
        call.concepts = call.concepts[half]
        call.batch_size, call.map_rows = rows, None
        return
    raise RuntimeError(f"the transformer was called with {call.batch_size} rows but its attention ran on {rows}; "
                       "a hook changed the batch in a way ConceptAttention cannot follow")


def clip_to_dtype(rows: torch.Tensor) -> torch.Tensor:
    """fp16 rows clipped to the fp16 range (as diffusers clips the text stream); others unchanged."""
    return rows.clip(-65504, 65504) if rows.dtype == torch.float16 else rows


def text_stream_update(concepts: torch.Tensor, attended: torch.Tensor, gate_msa: torch.Tensor,
                       mlp_input: Callable[[torch.Tensor], torch.Tensor], gate_mlp: torch.Tensor,
                       feed_forward: nn.Module) -> torch.Tensor:
    """The residual update of a dual block's text stream, applied to concept rows.

    ``concepts + gate_msa·attended``, then ``+ gate_mlp·feed_forward(mlp_input(rows))`` where
    ``mlp_input`` is the block's normalisation and modulation before its text MLP. Gates broadcast
    over the rows.
    """
    concepts = concepts + gate_msa * attended.to(concepts.dtype)
    return concepts + gate_mlp * feed_forward(mlp_input(concepts))


def modulated(norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rows -> norm(rows)·(1 + scale) + shift`` (AdaLN modulation; shift/scale broadcast over the rows)."""
    return lambda rows: norm(rows) * (1 + scale) + shift
