"""The adapter contract: what a model family provides, what it may ask of the session, and the registry.

Core defines these types and depends on nothing above it; each family's adapter (one file in
``concept_attention.adapters``) implements :class:`ModelAdapter` (videos: :class:`VideoAdapter`) and
registers itself with :func:`register_adapter`. During a run an adapter talks to the session only
through the narrow :class:`Recorder` protocol and the per-call :class:`CallState`.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, Sequence

import torch
from torch import nn

CFG_LAYOUTS = ("auto", "context", "batched", "sequential", "none")
"""How conditional and unconditional transformer calls are told apart (``ConceptAttention(cfg=...)``).

- ``context``: by the pipeline's ``transformer.cache_context("cond"/"uncond")`` names;
- ``batched``: one call holds ``[uncond, cond]`` rows; maps come from the second half;
- ``sequential``: within a denoising step the first call is the conditional one, the next unconditional;
- ``none``: every call is conditional (a bare transformer call, ``explain``);
- ``auto``: while the session's own pipeline runs, the family's pipeline layout
  (:meth:`ModelAdapter.pipeline_cfg`); otherwise by context name if there is one, else ``none``.
"""


@dataclass
class CallState:
    """What the session knows about the transformer call in progress (one per call)."""

    active: bool
    step: int
    timestep: float | None = None
    batch_size: int = 0
    grid: tuple[int, ...] = ()
    num_map_tokens: int = 0
    map_rows: slice | None = None
    """Batch rows whose maps are recorded (batched CFG: the conditional half); None = all."""
    map_offset: int = 0
    """Index of the first mapped image token among the image tokens (reference tokens may come first)."""
    concepts: torch.Tensor | None = None
    """The concept rows ``(batch, rows, width)``, updated block by block."""
    modulation: torch.Tensor | None = None
    """The family's modulation input for the concept rows (a ``temb``, a text modulation table, ...)."""
    concept_rotary: Any = None
    """Rotary embedding of the concept rows, for families whose text tokens have positions."""
    skipped_blocks: tuple[int, ...] = ()
    """Blocks the model itself leaves out of this call (e.g. SD3's ``skip_layers``): their processors do not run,
    and that is no sign of a cache reusing outputs."""


@dataclass(eq=False)
class BlockSlot:
    """One wrapped block's part in a session: fixed flags to read, per-call results to write.

    A processor gets its slot once (:meth:`Recorder.block_slot`) and inside a call touches nothing
    block-specific but its slot, so code traced by ``torch.compile`` holds no per-block integer
    (one compiled graph serves every block, e.g. with ``compile_repeated_blocks``). The session
    reads the results after the call, outside any compiled code.
    """

    index: int
    records: bool
    """Whether this block's maps are recorded."""
    updates: bool
    """Whether the concept rows continue past this block (a later block is recorded)."""
    ran: bool = False
    """Set when the concept step ran in the current call (a cache that skips the block leaves it False)."""
    maps: dict[str, torch.Tensor] | None = None
    """This call's ``(batch, tokens, concepts)`` maps per space."""
    vectors: tuple[torch.Tensor, torch.Tensor | None] | None = None
    """This call's raw (image, concept) output vectors (``keep_vectors``)."""

    def clear(self) -> None:
        self.ran, self.maps, self.vectors = False, None, None


@dataclass(frozen=True)
class ExplainRequest:
    """What :func:`concept_attention.explain` asks an adapter to turn into transformer inputs."""

    pipeline: Any
    pixels: torch.Tensor
    """(1, 3, H, W) in [-1, 1], already at the size the model runs at."""
    prompt: str
    timestep: float
    num_samples: int
    generator: torch.Generator
    max_sequence_length: int | None = None


class Recorder(Protocol):
    """What an adapter may ask of the session while a transformer call runs."""

    concept_modulation: str
    """``"zero"`` or ``"prompt"``: how the concept rows are modulated."""

    @property
    def concept_sizes(self) -> tuple[int, ...]:
        """Token rows of each concept, in order (their rows are concatenated in ``CallState.concepts``)."""

    @property
    def current_call(self) -> CallState | None:
        """The mapped call in progress, or None."""

    @property
    def last_layer(self) -> int:
        """The deepest recorded block: concept rows need no update after it."""

    def block_slot(self, block_index: int) -> BlockSlot:
        """The slot of a wrapped block (asked once, when its processor is made)."""

    def attend_and_record(self, slot: BlockSlot, concept_query: torch.Tensor, concept_key: torch.Tensor,
                          concept_value: torch.Tensor, image_key: torch.Tensor, image_value: torch.Tensor,
                          image_output: torch.Tensor) -> torch.Tensor:
        """Concept attention over ``[image keys; concept keys]``, scored into ``slot``; returns ``o_c``."""


class ModelAdapter(ABC):
    """Declares how one transformer family runs a concept stream.

    An adapter knows which blocks are dual-stream, how concepts are encoded by the family's
    pipeline, how a forward call's inputs give the image grid, and how to install (and undo) the
    concept-aware attention processors. The scoring math and the per-call bookkeeping are the
    session's. See ``docs/adding-a-family.md``.
    """

    family: ClassVar[str] = ""
    transformer_class_names: ClassVar[tuple[str, ...]] = ()
    default_concept_modulation: ClassVar[str] = "zero"
    """The family's ``concept_modulation`` when the user sets none (e.g. SD3: ``"prompt"``)."""
    video: ClassVar[bool] = False
    """Whether the family makes videos (then it is a :class:`VideoAdapter`)."""

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self._undo: list[Callable[[], None]] = []
        self._wrapped: list[tuple[nn.Module, Any]] = []
        self.recorder: Recorder | None = None

    @classmethod
    def matches(cls, transformer: nn.Module) -> bool:
        return type(transformer).__name__ in cls.transformer_class_names

    # -------------------------------------------------------------- structure
    @property
    def dual_blocks(self) -> Sequence[nn.Module]:
        """The blocks in which a concept stream runs beside the prompt stream."""
        return self.transformer.transformer_blocks

    @property
    def concept_embed_dim(self) -> int:
        """Width of a concept embedding as the bare transformer expects it."""
        return int(self.transformer.config.joint_attention_dim)

    def default_layers(self) -> list[int]:
        """The deeper half of the dual blocks (paper: FLUX.1 blocks 9–18)."""
        count = len(self.dual_blocks)
        return list(range(count // 2, count))

    def last_module_for(self, layer: int) -> nn.Module:
        """The module after which nothing is needed once ``layer``'s maps are recorded (early exit)."""
        return self.dual_blocks[layer]

    # -------------------------------------------------------------- concepts
    @abstractmethod
    def encode_concepts(self, pipeline: Any, concepts: Sequence[str], max_sequence_length: int | None
                        ) -> list[torch.Tensor]:
        """Each concept encoded alone by the pipeline's prompt encoder: one ``(tokens, embed_dim)`` tensor,
        special and padding tokens removed."""

    def embed_concepts(self, embeds: torch.Tensor) -> torch.Tensor:
        """Concept embeddings ``(rows, concept_embed_dim)`` projected into the text stream
        (default: ``context_embedder``, the projection the prompt goes through)."""
        return self.transformer.context_embedder(embeds)

    # -------------------------------------------------------------- calls
    def bind_call(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        """A transformer call's arguments by name."""
        signature = inspect.signature(type(self.transformer).forward)
        return signature.bind_partial(self.transformer, *args, **kwargs)

    def pipeline_cfg(self, pipeline: Any, call_arguments: inspect.BoundArguments) -> str:
        """The CFG layout of the family's pipeline call (``call_arguments`` bound to its ``__call__``).

        Default: ``context`` (diffusers pipelines name sequential CFG calls with ``cache_context``).
        """
        return "context"

    def is_auxiliary_call(self, bound: inspect.BoundArguments) -> bool:
        """Whether a call made by the running pipeline is neither conditional nor unconditional (e.g. SD3's
        skip-layer guidance): it is not mapped and not counted as a step. Default: no call is."""
        return False

    @abstractmethod
    def begin_call(self, bound: inspect.BoundArguments, call: CallState) -> None:
        """Fill ``call`` (batch size, grid, map tokens, timestep, ...) from a mapped forward call.

        The session then adds the concept rows; adapters never touch them here.
        """

    # -------------------------------------------------------------- real images
    def image_size_rule(self, pipeline: Any) -> tuple[int, int]:
        """(native shorter side in pixels, multiple every side must be) of the model's images."""
        raise NotImplementedError(f"explaining real images is not supported for the {self.family} family yet")

    def explain_inputs(self, request: ExplainRequest) -> dict[str, Any]:
        """Transformer keyword arguments for noised latents of ``request.pixels``."""
        raise NotImplementedError(f"explaining real images is not supported for the {self.family} family yet")

    def draw_noise(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Standard normal noise drawn in float32 on the CPU (the same on every device), on the model's device."""
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
        return noise.to(device=self.transformer.device, dtype=self.transformer.dtype)

    # -------------------------------------------------------------- install
    @abstractmethod
    def install(self, recorder: Recorder, blocks: Sequence[int]) -> None:
        """Put concept-aware processors (and any hooks) on ``blocks``; register undo actions with :meth:`on_undo`."""

    def attach(self, recorder: Recorder) -> None:
        """Start an install: remember ``recorder`` (forgotten again as the last undo action)."""
        self.recorder = recorder
        self.on_undo(self._forget_recorder)

    def _forget_recorder(self) -> None:
        self.recorder = None

    @property
    def current_call(self) -> CallState | None:
        """The recorder's mapped call in progress (None outside a session or a mapped call)."""
        return self.recorder.current_call if self.recorder is not None else None

    def wrap_processors(self, blocks: Sequence[int], attention: str, known: tuple[type, ...],
                        make_wrapper: Callable[[Any, nn.Module, int], Any]) -> None:
        """Wrap ``block.<attention>.processor`` of each block in ``blocks``; undone by :meth:`restore`.

        Every processor is checked first (an unknown class, e.g. an IP-adapter or a custom
        processor, is refused naming the module, before anything is touched). ``make_wrapper(original,
        block, index)`` returns an object with ``hook(attn)``/``unhook()`` that is callable like the original.
        """
        names = {id(module): name for name, module in self.transformer.named_modules()}
        for index in blocks:
            attn = getattr(self.dual_blocks[index], attention)
            refuse_unknown(attn.processor, known, self.family, names.get(id(attn), f"block {index}.{attention}"))
        for index in blocks:
            block = self.dual_blocks[index]
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
                    "set_attn_processor(); do that before entering the ConceptAttention block")

    def on_undo(self, action: Callable[[], None]) -> None:
        self._undo.append(action)

    def restore(self) -> None:
        """Undo everything :meth:`install` did, newest first; never stops half-way."""
        errors = []
        while self._undo:
            action = self._undo.pop()
            try:
                action()
            except Exception as error:  # keep restoring the rest
                errors.append(error)
        if errors:
            raise errors[0]


class VideoAdapter(ModelAdapter):
    """A family that makes videos: maps are ``(batch, concepts, frames, h, w)``; real videos via ``explain_video``."""

    video: ClassVar[bool] = True

    @abstractmethod
    def frame_rule(self, pipeline: Any) -> tuple[int, int, int]:
        """(VAE temporal ratio, multiple the latent frame count must be, native number of pixel frames)."""

    @abstractmethod
    def native_frame_size(self, pipeline: Any) -> tuple[int, int]:
        """(width, height) in pixels the model was trained at."""

    @abstractmethod
    def video_latents(self, pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents of ``pixels`` (1, 3, F, H, W), frames on axis 1: ``(1, F, ...)`` (an adapter whose
        transformer takes another layout rearranges them in :meth:`video_inputs`)."""

    @abstractmethod
    def video_inputs(self, pipeline: Any, latents: torch.Tensor, noise: torch.Tensor, prompt: str,
                     timestep: float, max_sequence_length: int | None) -> dict[str, Any]:
        """Transformer keyword arguments: ``latents`` noised by each row of ``noise`` at noise level ``timestep``."""


def refuse_unknown(processor: Any, known: tuple[type, ...], family: str, where: str) -> None:
    """A TypeError naming ``where`` unless ``processor`` is exactly one of the ``known`` classes."""
    if type(processor) not in known:
        raise TypeError(
            f"{where} uses {type(processor).__name__}, which the {family} adapter does not know (expected "
            f"{', '.join(c.__name__ for c in known)}); remove IP-adapters or custom processors before using "
            "ConceptAttention")


_REGISTRY: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator adding an adapter to the registry."""
    if cls not in _REGISTRY:
        _REGISTRY.append(cls)
    return cls


def registered_adapters() -> list[type[ModelAdapter]]:
    """Every registered adapter class, in registration order."""
    return list(_REGISTRY)


def supported_transformers() -> list[str]:
    """Transformer class names some registered adapter handles."""
    return [name for cls in _REGISTRY for name in cls.transformer_class_names]


def resolve_adapter(transformer: nn.Module) -> ModelAdapter:
    """The adapter for ``transformer``'s class, or a TypeError listing what is supported."""
    for cls in _REGISTRY:
        if cls.matches(transformer):
            return cls(transformer)
    raise TypeError(
        f"ConceptAttention does not support {type(transformer).__name__}; supported transformer classes: "
        f"{', '.join(supported_transformers()) or 'none registered (import concept_attention)'}")
