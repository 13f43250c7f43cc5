"""The ConceptAttention context manager: install, record running sums, restore."""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..adapters import resolve_adapter
from ..adapters.base import ModelAdapter
from ..loading import pipeline_defaults
from .maps import ConceptMaps
from .scoring import (
    SPACES, BlockActivations, ConceptGroups, RunningMaps, concept_attention, concept_maps, token_scores,
)

MANY_PIECES = 4
"""Warn when a concept is split into more token pieces than this."""

CONCEPT_MODULATIONS = ("zero", "prompt")

_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclass
class CallState:
    """What the session knows about the transformer call in progress."""

    active: bool
    step: int
    timestep: float | None = None
    batch_size: int = 0
    grid: tuple[int, ...] = ()
    num_map_tokens: int = 0
    map_rows: slice | None = None
    """Batch rows whose maps are recorded (batched CFG: the conditional half); None = all."""
    concepts: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _check_concepts(concepts: Any) -> list[str]:
    if isinstance(concepts, str):
        raise TypeError("concepts must be a list of strings, e.g. ['dog', 'sky'], not a single string")
    try:
        items = list(concepts)
    except TypeError:
        raise TypeError(f"concepts must be a list of strings, got {type(concepts).__name__}") from None
    if not items:
        raise ValueError("concepts is empty: give at least one concept, e.g. concepts=['dog', 'background']")
    names, seen = [], {}
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"every concept must be a string, got {item!r} ({type(item).__name__})")
        name = item.strip()
        if not name:
            raise ValueError("concepts contains an empty string")
        key = name.lower()
        if key in seen:
            raise ValueError(f"duplicate concept {name!r} (also given as {seen[key]!r})")
        seen[key] = name
        names.append(name)
    return names


def _check_layers(layers: Any, count: int, default: list[int]) -> list[int]:
    if layers is None:
        return list(default)
    if isinstance(layers, int):
        layers = [layers]
    try:
        items = list(layers)
    except TypeError:
        raise TypeError(f"layers must be a list of block indices, got {type(layers).__name__}") from None
    if not items:
        raise ValueError("layers is empty")
    resolved = []
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer indices must be integers, got {layer!r}")
        if not -count <= layer < count:
            raise ValueError(f"layer {layer} is out of range: this model has {count} dual-stream blocks (0–{count - 1})")
        resolved.append(layer % count)
    return sorted(set(resolved))


def _check_steps(timesteps: Any) -> set[int] | None:
    if timesteps is None:
        return None
    if isinstance(timesteps, int):
        timesteps = [timesteps]
    try:
        items = list(timesteps)
    except TypeError:
        raise TypeError("timesteps must be a list of denoising-step indices (0 = first step)") from None
    if not items:
        raise ValueError("timesteps is empty")
    for step in items:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"timesteps must be non-negative step indices (0 = first step), got {step!r}")
    return set(items)


def _check_spaces(space: Any) -> tuple[str, ...]:
    spaces = (space,) if isinstance(space, str) else tuple(space)
    if not spaces:
        raise ValueError("space is empty")
    for item in spaces:
        if item not in SPACES:
            raise ValueError(f"unknown space {item!r}; choose from {', '.join(SPACES)}")
    return tuple(dict.fromkeys(spaces))


class ConceptAttention:
    """Record ConceptAttention saliency maps while a diffusion transformer runs.

    ``model`` is a diffusers pipeline (concepts are encoded with its own prompt encoder) or a bare
    transformer (then pass ``concept_embeds``: one ``(tokens, embed_dim)`` tensor per concept in
    the prompt-encoder space). Inside the ``with`` block, call the pipeline or transformer as
    usual: its outputs are unchanged. Afterwards ``maps`` holds one map per concept.

    Example::

        with ConceptAttention(pipe, concepts=["dog", "tree", "sky"]) as ca:
            image = pipe("a dog by a tree").images[0]
        ca.maps.overlay(image, "dog").save("dog.png")

    Args:
        layers: dual-stream block indices to average (default: the deeper half).
        timesteps: denoising-step indices to average (default: all steps).
        space: ``"output"`` (ConceptAttention), ``"cross_attention"`` or ``"value"``; a list
            records several spaces in one run (``maps_for(space)``), the first is ``maps``.
        softmax: softmax over concepts per (layer, step) before averaging (off for one concept).
        concept_self_attention / concept_cross_attention: let concept queries see concept keys /
            image keys (paper Table 4 ablations).
        concept_modulation: ``"zero"`` (timestep embedding with a zero pooled-text vector, as the
            authors' FLUX code does) or ``"prompt"`` (reuse the prompt's modulation); default: the
            family's (FLUX.1: zero, SD3: prompt, as the authors' code for each).
        keep_vectors: also keep raw image/concept output vectors per (step, layer) on the CPU.
        max_sequence_length: token length used to encode concepts (default: the pipeline's).
    """

    def __init__(
        self,
        model: Any,
        concepts: Sequence[str],
        *,
        concept_embeds: Sequence[torch.Tensor] | None = None,
        layers: Iterable[int] | int | None = None,
        timesteps: Iterable[int] | int | None = None,
        space: str | Sequence[str] = "output",
        softmax: bool = True,
        concept_self_attention: bool = True,
        concept_cross_attention: bool = True,
        concept_modulation: str | None = None,
        keep_vectors: bool = False,
        max_sequence_length: int | None = None,
    ) -> None:
        self.concepts = _check_concepts(concepts)
        self.transformer, self.pipeline = _split_model(model)
        self.adapter: ModelAdapter = resolve_adapter(self.transformer)
        defaults = pipeline_defaults(self.pipeline) if self.pipeline is not None else {}
        num_blocks = len(self.adapter.dual_blocks)
        default_layers = defaults.get("layers") or self.adapter.default_layers()
        self.layers = _check_layers(layers, num_blocks, [int(layer) for layer in default_layers])
        self.max_sequence_length = max_sequence_length or defaults.get("max_sequence_length")
        self.selected_steps = _check_steps(timesteps)
        self.spaces = _check_spaces(space)
        if concept_modulation is None:
            concept_modulation = getattr(self.adapter, "default_concept_modulation", "zero")
        if concept_modulation not in CONCEPT_MODULATIONS:
            raise ValueError(f"concept_modulation must be 'zero' or 'prompt', not {concept_modulation!r}")
        self.concept_modulation = concept_modulation
        self.softmax = bool(softmax)
        self.concept_self_attention = bool(concept_self_attention)
        self.concept_cross_attention = bool(concept_cross_attention)
        self.keep_vectors = bool(keep_vectors)

        if self.pipeline is None:
            if concept_embeds is None:
                raise ValueError(
                    f"a bare {type(self.transformer).__name__} needs concept_embeds: one (tokens, "
                    f"{self.adapter.concept_embed_dim}) tensor per concept"
                )
            self.concept_embeds = self._check_embeds(concept_embeds)
        else:
            if concept_embeds is not None:
                self.concept_embeds = self._check_embeds(concept_embeds)
            else:
                self.concept_embeds = self.adapter.encode_concepts(
                    self.pipeline, self.concepts, self.max_sequence_length
                )
        self.groups = ConceptGroups(tuple(self.concepts), tuple(int(e.shape[0]) for e in self.concept_embeds))
        many = [f"{n!r} ({s} pieces)" for n, s in zip(self.groups.names, self.groups.sizes) if s > MANY_PIECES]
        if many:
            warnings.warn(
                "some concepts split into many tokens; their scores are averaged over all pieces: " + ", ".join(many),
                stacklevel=2,
            )

        self._sums: RunningMaps | None = None
        self._averaging: torch.Tensor | None = None
        self._call: CallState | None = None
        self._steps_seen = 0
        self._recorded_steps: list[int] = []
        self._recorded_timesteps: list[float] = []
        self._grid: tuple[int, ...] = ()
        self._installed = False
        self.vectors: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ setup
    def _check_embeds(self, embeds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(embeds, torch.Tensor):
            raise TypeError("concept_embeds must be a list with one (tokens, dim) tensor per concept")
        embeds = list(embeds)
        if len(embeds) != len(self.concepts):
            raise ValueError(f"{len(embeds)} concept_embeds for {len(self.concepts)} concepts")
        width = self.adapter.concept_embed_dim
        checked = []
        for name, embed in zip(self.concepts, embeds):
            if not isinstance(embed, torch.Tensor):
                raise TypeError(f"concept_embeds for {name!r} must be a torch.Tensor, got {type(embed).__name__}")
            if embed.dim() == 1:
                embed = embed[None]
            if embed.dim() != 2 or embed.shape[0] < 1 or embed.shape[1] != width:
                raise ValueError(
                    f"concept_embeds for {name!r} has shape {tuple(embed.shape)}; expected (tokens, {width})"
                )
            checked.append(embed)
        return checked

    def __enter__(self) -> "ConceptAttention":
        if self.transformer in _ACTIVE:
            raise RuntimeError(
                "a ConceptAttention session is already installed on this transformer; nesting is not supported"
            )
        self._reset()
        try:
            self.adapter.install(self, range(max(self.layers) + 1))
            self._install_call_hook()
        except BaseException:
            self.adapter.restore()
            raise
        _ACTIVE.add(self.transformer)
        self._installed = True
        return self

    def __exit__(self, *exc_info: Any) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Remove every processor and hook (also done by leaving the ``with`` block)."""
        if not self._installed:
            return
        self._installed = False
        self._call = None
        _ACTIVE.discard(self.transformer)
        self.adapter.restore()

    def _reset(self) -> None:
        self._sums = RunningMaps(self.layers, self.spaces)
        self._steps_seen = 0
        self._recorded_steps = []
        self._recorded_timesteps = []
        self._grid = ()
        self.vectors = []

    def _install_call_hook(self) -> None:
        from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager

        session = self

        class _NoState:
            def reset(self, *args: Any, **kwargs: Any) -> None:
                pass

        class CallHook(ModelHook):
            """Reads each transformer call's inputs and the pipeline's cache-context name."""

            _is_stateful = True

            def __init__(self) -> None:
                super().__init__()
                self.state = StateManager(_NoState)

            def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any):
                context = getattr(self.state, "_context", None)
                session._begin_call(args, kwargs, getattr(context, "name", None))
                return args, kwargs

            def post_forward(self, module: nn.Module, output: Any) -> Any:
                session._end_call()
                return output

            def reset_state(self, module: nn.Module) -> nn.Module:
                return module

        module = self.transformer
        had_registry = "_diffusers_hook" in module.__dict__
        had_forward = "forward" in module.__dict__
        registry = HookRegistry.check_if_exists_or_initialize(module)
        name = "concept_attention"
        registry.register_hook(CallHook(), name)

        def undo() -> None:
            registry.remove_hook(name, recurse=False)
            if not had_forward and "forward" in module.__dict__:
                del module.__dict__["forward"]
            if not had_registry and not registry.hooks and "_diffusers_hook" in module.__dict__:
                del module.__dict__["_diffusers_hook"]

        self.adapter.on_undo(undo)

    # ------------------------------------------------------------------ calls
    def _begin_call(self, args: tuple, kwargs: dict, context_name: str | None) -> None:
        bound = self.adapter.bind_call(args, kwargs)
        conditional = self.adapter.is_conditional_call(bound, context_name)
        step = self._steps_seen
        active = conditional and (self.selected_steps is None or step in self.selected_steps)
        call = CallState(active=active, step=step)
        if conditional:
            self._steps_seen += 1
        if active:
            self.adapter.verify_processors()
            with torch.no_grad():
                self.adapter.begin_call(bound, call)
            if self._grid and call.grid != self._grid:
                raise RuntimeError(
                    f"this session recorded maps on a {self._grid} grid and now sees {call.grid}; "
                    "use one ConceptAttention session per image size"
                )
            self._grid = call.grid
            self._recorded_steps.append(step)
            if call.timestep is not None:
                self._recorded_timesteps.append(call.timestep)
        self._call = call

    def _end_call(self) -> None:
        self._call = None

    @property
    def last_layer(self) -> int:
        """The deepest block whose maps are recorded; concept rows are not needed after it."""
        return max(self.layers)

    @property
    def current_call(self) -> CallState | None:
        """The active conditional call, or None (no call, unconditional call, unselected step)."""
        call = self._call
        return call if call is not None and call.active else None

    def wants_maps(self, block_index: int) -> bool:
        return block_index in self._sums._position  # type: ignore[union-attr]

    def attend_and_record(
        self,
        block_index: int,
        concept_query: torch.Tensor,
        concept_key: torch.Tensor,
        concept_value: torch.Tensor,
        image_key: torch.Tensor,
        image_value: torch.Tensor,
        image_output: torch.Tensor,
    ) -> torch.Tensor:
        """Concept attention with this session's ablation switches, then :meth:`record`; returns ``o_c``."""
        concept_output = concept_attention(
            concept_query, concept_key, concept_value, image_key, image_value,
            cross_attention=self.concept_cross_attention, self_attention=self.concept_self_attention,
        )
        self.record(block_index, BlockActivations(
            concept_query=concept_query, concept_key=concept_key, concept_value=concept_value,
            image_key=image_key, image_value=image_value, image_output=image_output,
            concept_output=concept_output,
        ))
        return concept_output

    def record(self, block_index: int, activations: BlockActivations) -> None:
        """Score one block's activations in every requested space and add to the running sums."""
        if not self.wants_maps(block_index):
            return
        call = self.current_call
        assert call is not None and self._sums is not None
        activations.num_map_tokens = call.num_map_tokens
        if call.map_rows is not None:
            activations = activations.rows(call.map_rows)
        device = activations.image_output.device
        if self._averaging is None or self._averaging.device != device:
            self._averaging = self.groups.averaging_matrix(device)
        softmax = self.softmax and len(self.concepts) > 1
        for space in self.spaces:
            scores = token_scores(space, activations)
            self._sums.add(block_index, space, concept_maps(scores, self._averaging, softmax=softmax))
        if self.keep_vectors:
            n = call.num_map_tokens
            self.vectors.append(
                {
                    "step": call.step,
                    "layer": block_index,
                    "image_output": activations.image_output[:, :n].flatten(2).detach().cpu(),
                    "concept_output": activations.concept_output.flatten(2).detach().cpu()
                    if activations.concept_output is not None
                    else None,
                }
            )

    # ------------------------------------------------------------------ results
    @property
    def steps(self) -> list[int]:
        """Indices of the denoising steps whose maps were recorded."""
        return list(self._recorded_steps)

    @property
    def maps(self) -> ConceptMaps:
        """Maps in the first requested space; other recorded spaces are in ``maps.others``."""
        primary = self.maps_for(self.spaces[0])
        primary.others = {space: self.maps_for(space) for space in self.spaces[1:]}
        return primary

    def maps_for(self, space: str) -> ConceptMaps:
        if space not in self.spaces:
            raise ValueError(f"space {space!r} was not recorded; this session recorded {list(self.spaces)}")
        if self._sums is None or self._sums.empty:
            raise RuntimeError(
                "no maps were recorded: call the pipeline or transformer inside the `with ConceptAttention(...)` "
                "block (and check that `timesteps` selects steps that ran)"
            )
        per_layer_tokens = self._sums.mean(space)  # (L, B, N, C)
        layers, batch, _, concepts = per_layer_tokens.shape
        per_layer = per_layer_tokens.permute(0, 1, 3, 2).reshape(layers, batch, concepts, *self._grid)
        per_layer = per_layer.detach().float().cpu()
        return ConceptMaps(
            tensor=per_layer.mean(dim=0),
            concepts=list(self.concepts),
            layers=list(self.layers),
            timesteps=list(self._recorded_timesteps),
            steps=list(self._recorded_steps),
            space=space,
            softmax=self.softmax and len(self.concepts) > 1,
            per_layer=per_layer,
            meta={
                "model": type(self.transformer).__name__,
                "family": self.adapter.family,
                "concept_tokens": list(self.groups.sizes),
                "concept_modulation": self.concept_modulation,
                "concept_self_attention": self.concept_self_attention,
                "concept_cross_attention": self.concept_cross_attention,
            },
        )


def _split_model(model: Any) -> tuple[nn.Module, Any]:
    """(transformer, pipeline-or-None) from a diffusers pipeline or a bare transformer."""
    if isinstance(model, nn.Module):
        return model, None
    transformer = getattr(model, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer, model
    raise TypeError(
        "ConceptAttention needs a diffusers pipeline with a `transformer` (e.g. FluxPipeline) or a "
        f"transformer model (e.g. FluxTransformer2DModel), got {type(model).__name__}"
    )

