"""The contract every model-family adapter fulfils, and the registry that picks one."""

from __future__ import annotations

import inspect
import sys
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..core.session import CallState, ConceptAttention


class ModelAdapter(ABC):
    """Declares how one transformer family runs a concept stream.

    An adapter knows: which blocks are dual-stream, how concepts are encoded by the family's
    pipeline, how a forward call's inputs give the image grid, and how to install (and undo) the
    concept-aware attention processors. The scoring math lives in :mod:`concept_attention.core`.
    """

    family: ClassVar[str] = ""
    transformer_class_names: ClassVar[tuple[str, ...]] = ()
    default_concept_modulation: ClassVar[str] = "zero"
    """The family's preferred ``concept_modulation`` (e.g. SD3: ``"prompt"``, as the authors' code).

    Informational until the session resolves an unset ``concept_modulation`` to it; adapters
    always follow the session's ``concept_modulation``.
    """
    video: ClassVar[bool] = False
    """Whether the family makes videos: real inputs go to ``explain_video``, not ``explain``."""

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self._undo: list[Callable[[], None]] = []
        self._wrapped: list[tuple[nn.Module, Any]] = []
        self._session: "ConceptAttention | None" = None
        self._concept_rows: torch.Tensor | None = None

    # -------------------------------------------------------------- structure
    @classmethod
    def matches(cls, transformer: nn.Module) -> bool:
        return type(transformer).__name__ in cls.transformer_class_names

    @property
    @abstractmethod
    def dual_blocks(self) -> Sequence[nn.Module]:
        """The blocks in which a concept stream runs beside the prompt stream."""

    def default_layers(self) -> list[int]:
        """The deeper half of the dual blocks (paper: FLUX.1 blocks 9–18)."""
        n = len(self.dual_blocks)
        return list(range(n // 2, n))

    # -------------------------------------------------------------- concepts
    @abstractmethod
    def encode_concepts(
        self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
    ) -> list[torch.Tensor]:
        """Encode each concept alone through the pipeline's prompt encoder.

        Returns one ``(tokens, embed_dim)`` tensor per concept with special and padding
        tokens removed.
        """

    @property
    @abstractmethod
    def concept_embed_dim(self) -> int:
        """Width of a concept embedding as the bare transformer expects it."""

    def embed_concepts(self, embeds: torch.Tensor) -> torch.Tensor:
        """Concept embeddings (rows, ``concept_embed_dim``) projected into the text stream.

        Default: the transformer's ``context_embedder``, which projects the prompt the same way.
        """
        return self.transformer.context_embedder(embeds)

    def concept_rows(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The session's concepts as text-stream rows (rows, width), cached per dtype and device."""
        rows = self._concept_rows
        if rows is None or rows.dtype != dtype or rows.device != device:
            session = self._session
            assert session is not None
            embeds = torch.cat([e.to(device=device, dtype=dtype) for e in session.concept_embeds], dim=0)
            rows = self.embed_concepts(embeds)
            self._concept_rows = rows
        return rows

    # -------------------------------------------------------------- calls
    def bind_call(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        signature = inspect.signature(type(self.transformer).forward)
        bound = signature.bind_partial(self.transformer, *args, **kwargs)
        return bound

    def is_conditional_call(self, bound: inspect.BoundArguments, context_name: str | None) -> bool:
        """Whether a transformer call is a conditional (mapped) one.

        Default: diffusers pipelines wrap sequential CFG calls in ``cache_context("cond"/"uncond")``;
        calls without a context (a bare transformer) all count. Families whose pipelines run
        sequential CFG without a context name override this.
        """
        return context_name is None or "uncond" not in context_name.lower()

    @abstractmethod
    def begin_call(self, bound: inspect.BoundArguments, call: "CallState") -> None:
        """Fill the call state (batch size, grid, concept rows, ...) from a forward call."""

    @property
    def current_call(self) -> "CallState | None":
        """The installed session's active call (None outside a session or a mapped call)."""
        session = self._session
        return session.current_call if session is not None else None

    # -------------------------------------------------------------- real images
    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        """(native shorter side in pixels, multiple every side must be) for ``explain``."""
        raise NotImplementedError(f"explaining real images is not supported for the {self.family} family yet")

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
        """Transformer keyword arguments for noised latents of ``pixels`` (1, 3, H, W in [-1, 1])."""
        raise NotImplementedError(f"explaining real images is not supported for the {self.family} family yet")

    def noised_latents(
        self,
        pipeline: Any,
        pixels: torch.Tensor,
        timestep: float,
        noise: torch.Tensor | None,
        num_samples: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """VAE latents of ``pixels`` (with the VAE's shift/scaling), noised by flow matching.

        ``x_t = (1 - t)·x_0 + t·noise`` for ``num_samples`` noise draws: (num_samples, C, h, w).
        """
        vae, transformer = pipeline.vae, self.transformer
        device, dtype = transformer.device, transformer.dtype
        with torch.no_grad():
            encoded = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((encoded - shift) * vae.config.scaling_factor).to(dtype)
        return self.flow_noised(latents.expand(num_samples, *latents.shape[1:]), timestep, noise, generator)

    def flow_noised(
        self, latents: torch.Tensor, timestep: float, noise: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor:
        """``(1 - t)·latents + t·noise``; without ``noise``, a draw from ``generator`` (:meth:`draw_noise`)."""
        if noise is None:
            noise = self.draw_noise(latents.shape, generator)
        return (1.0 - timestep) * latents + timestep * noise

    def draw_noise(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Standard normal noise drawn in float32 on the CPU (same on every device), on the transformer's device."""
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
        return noise.to(device=self.transformer.device, dtype=self.transformer.dtype)

    def last_module_for(self, layer: int) -> nn.Module:
        """The module after which nothing is needed once ``layer``'s maps are recorded (early exit)."""
        return self.dual_blocks[layer]

    # -------------------------------------------------------------- install
    @abstractmethod
    def install(self, session: "ConceptAttention", blocks: Sequence[int]) -> None:
        """Put concept-aware processors (and any hooks) on ``blocks``; register undo actions."""

    def attach(self, session: "ConceptAttention") -> None:
        """Start an install: remember ``session`` (forgotten again as the last undo action)."""
        self._session = session
        self._concept_rows = None
        self.on_undo(self._forget_session)

    def _forget_session(self) -> None:
        self._session = None
        self._concept_rows = None

    def wrap_processors(
        self,
        blocks: Sequence[int],
        attention: str,
        known: tuple[type, ...],
        make_wrapper: Callable[[Any, nn.Module, int], Any],
    ) -> None:
        """Wrap ``block.<attention>.processor`` of each block in ``blocks``; undone by :meth:`restore`.

        Every processor is checked first (an unknown class — an IP-adapter, a custom processor —
        is refused naming the module, before anything is touched). ``make_wrapper(original,
        block, index)`` returns an object with ``hook(attn)``/``unhook()`` that is callable like
        the original processor.
        """
        all_blocks = self.dual_blocks
        for index in blocks:
            processor = getattr(all_blocks[index], attention).processor
            if type(processor) not in known:
                raise TypeError(
                    f"transformer_blocks.{index}.{attention} uses {type(processor).__name__}, which the "
                    f"{self.family} adapter does not know (expected {', '.join(c.__name__ for c in known)}); "
                    "remove IP-adapters or custom processors before using ConceptAttention"
                )
        for index in blocks:
            block = all_blocks[index]
            attn = getattr(block, attention)
            original = attn.processor
            wrapper = make_wrapper(original, block, index)
            wrapper.hook(attn)
            attn.processor = wrapper  # set_processor would log on every call; plain assignment is silent
            self._wrapped.append((attn, wrapper))

            def undo(attn: nn.Module = attn, original: Any = original, wrapper: Any = wrapper) -> None:
                wrapper.unhook()
                attn.processor = original

            self.on_undo(undo)
        self.on_undo(self._wrapped.clear)

    def verify_processors(self) -> None:
        """Raise if a wrapped processor was replaced while installed (e.g. ``fuse_qkv_projections()``)."""
        for attn, wrapper in self._wrapped:
            if attn.processor is not wrapper:
                raise RuntimeError(
                    f"the attention processor of {type(attn).__name__} was replaced while ConceptAttention was "
                    f"installed (now {type(attn.processor).__name__}), e.g. by fuse_qkv_projections() or "
                    "set_attn_processor(); do that before entering the ConceptAttention block"
                )

    def on_undo(self, action: Callable[[], None]) -> None:
        self._undo.append(action)

    def restore(self) -> None:
        """Undo everything :meth:`install` did, newest first; never raises half-way."""
        errors = []
        while self._undo:
            action = self._undo.pop()
            try:
                action()
            except Exception as error:  # keep restoring the rest
                errors.append(error)
        if errors:
            raise errors[0]


def latent_size_rule(pipeline: Any, patch: int) -> tuple[int, int]:
    """``image_size_rule`` of a VAE-latent pipeline whose transformer patches ``patch`` × ``patch`` latents."""
    scale = int(getattr(pipeline, "vae_scale_factor", 8))
    native = int(getattr(pipeline, "default_sample_size", 128)) * scale
    return native, scale * patch


def timestep_value(timestep: Any, position: int = 0) -> float | None:
    """A transformer call's ``timestep`` argument as one float (``position`` in a tensor), or None."""
    if isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
        return float(timestep.flatten()[position])
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return None


def pooled_text_modulation(
    session: "ConceptAttention | None", module: nn.Module, args: tuple, output: torch.Tensor
) -> None:
    """Forward hook on a ``time_text_embed(timestep, [guidance,] pooled)`` layer: the concept rows' ``temb``.

    ``concept_modulation="prompt"`` reuses the prompt's embedding; ``"zero"`` recomputes it with a
    zero pooled text vector (FLUX.1 and SD3 embed timestep and pooled text this way).
    """
    call = session.current_call if session is not None else None
    if call is None:
        return
    if session.concept_modulation == "prompt":
        call.extras["concept_temb"] = output
    else:
        pooled = args[-1]
        with torch.no_grad():
            call.extras["concept_temb"] = module.forward(*args[:-1], torch.zeros_like(pooled))


def running_pipeline(transformer: nn.Module, max_depth: int = 100) -> Any:
    """The pipeline whose ``__call__`` is calling ``transformer`` right now, or None.

    Pipeline attributes such as ``do_classifier_free_guidance`` keep their last value after a
    run, so they only describe a call made by a running pipeline; a direct transformer call (a
    bare call, ``explain``) is told apart by looking for a ``__call__`` frame of a pipeline that
    holds this transformer (any pipeline sharing it, not only the one given to the session).
    """
    frame = sys._getframe(1)
    depth = 0
    while frame is not None and depth < max_depth:
        if frame.f_code.co_name == "__call__":
            owner = frame.f_locals.get("self")
            if getattr(owner, "transformer", None) is transformer:
                return owner
        frame = frame.f_back
        depth += 1
    return None


_REGISTRY: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator adding an adapter to the registry."""
    _REGISTRY.append(cls)
    return cls


def supported_transformers() -> list[str]:
    return [name for cls in _REGISTRY for name in cls.transformer_class_names]


def resolve_adapter(transformer: nn.Module) -> ModelAdapter:
    """The adapter for ``transformer``'s class, or a TypeError listing what is supported."""
    for cls in _REGISTRY:
        if cls.matches(transformer):
            return cls(transformer)
    raise TypeError(
        f"ConceptAttention does not support {type(transformer).__name__}; supported transformer "
        f"classes: {', '.join(supported_transformers())}"
    )
