"""The ConceptAttention context manager: install, record running sums, restore."""

from __future__ import annotations

import inspect
import warnings
import weakref
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .calls import (
    CallSignals, call_layout, check_cfg, hook_transformer_calls, is_conditional, watch_cache_context,
    watch_pipeline_calls,
)
from .contract import BlockSlot, CallState, ModelAdapter, resolve_adapter
from .defaults import (
    check_concepts, model_default_layers, model_notice, non_empty_list, pipeline_defaults, resolve_layers,
)
from .maps import ConceptMaps
from .scoring import SPACES, BlockActivations, ConceptGroups, RunningMaps, concept_attention, concept_maps, token_scores

MANY_PIECES = 4
"""Warn when a concept is split into more token pieces than this."""

CONCEPT_MODULATIONS = ("zero", "prompt")

_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _check_steps(timesteps: Any) -> set[int] | None:
    if timesteps is None:
        return None
    if isinstance(timesteps, int):
        timesteps = [timesteps]
    items = non_empty_list(timesteps, "timesteps", "a list of denoising-step indices (0 = first step)")
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


def _check_modulation(modulation: str | None, adapter: ModelAdapter) -> str:
    modulation = modulation or adapter.default_concept_modulation
    if modulation not in CONCEPT_MODULATIONS:
        raise ValueError(f"concept_modulation must be 'zero' or 'prompt', not {modulation!r}")
    return modulation


def _check_embeds(embeds: Any, concepts: list[str], width: int) -> list[torch.Tensor]:
    """User-given concept embeddings: one ``(tokens, width)`` tensor per concept."""
    if isinstance(embeds, torch.Tensor):
        raise TypeError("concept_embeds must be a list with one (tokens, dim) tensor per concept")
    embeds = list(embeds)
    if len(embeds) != len(concepts):
        raise ValueError(f"{len(embeds)} concept_embeds for {len(concepts)} concepts")
    checked = []
    for name, embed in zip(concepts, embeds):
        if not isinstance(embed, torch.Tensor):
            raise TypeError(f"concept_embeds for {name!r} must be a torch.Tensor, got {type(embed).__name__}")
        embed = embed[None] if embed.dim() == 1 else embed
        if embed.dim() != 2 or embed.shape[0] < 1 or embed.shape[1] != width:
            raise ValueError(f"concept_embeds for {name!r} has shape {tuple(embed.shape)}; expected (tokens, {width})")
        checked.append(embed)
    return checked


def _warn_about_encodings(names: Sequence[str], embeds: Sequence[torch.Tensor]) -> None:
    """Warn when concepts split into many pieces or two concepts encode to the very same vectors."""
    many = [f"{n!r} ({e.shape[0]} pieces)" for n, e in zip(names, embeds) if e.shape[0] > MANY_PIECES]
    if many:
        warnings.warn("some concepts split into many tokens; their scores are averaged over all pieces: "
                      + ", ".join(many), stacklevel=3)
    for i in range(len(embeds)):
        for j in range(i + 1, len(embeds)):
            if embeds[i].shape == embeds[j].shape and torch.equal(embeds[i], embeds[j]):
                warnings.warn(f"concepts {names[i]!r} and {names[j]!r} encode to the same tokens (the model's "
                              "vocabulary cannot tell them apart): their maps will be identical", stacklevel=3)


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
        layers: dual-stream block indices to average (default: the model's, else the deeper half).
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
        cfg: how conditional calls are told from unconditional ones: ``"auto"`` (the session's
            pipeline declares its layout while it runs; other calls by ``cache_context`` name, else
            all mapped), ``"batched"`` (``[uncond, cond]`` rows: map the second half),
            ``"sequential"`` (first call of each step), ``"context"`` or ``"none"`` (map every call).
    """

    def __init__(self, model: Any, concepts: Sequence[str], *, concept_embeds: Sequence[torch.Tensor] | None = None,
                 layers: Iterable[int] | int | None = None, timesteps: Iterable[int] | int | None = None,
                 space: str | Sequence[str] = "output", softmax: bool = True, concept_self_attention: bool = True,
                 concept_cross_attention: bool = True, concept_modulation: str | None = None,
                 keep_vectors: bool = False, max_sequence_length: int | None = None, cfg: str = "auto") -> None:
        self.concepts = check_concepts(concepts)
        self.transformer, self.pipeline = split_model(model)
        self._called = called_module(model)
        self.adapter: ModelAdapter = resolve_adapter(self.transformer)
        self.layers = resolve_layers(layers, len(self.adapter.dual_blocks),
                                     model_default_layers(self.pipeline, self.adapter))
        self.max_sequence_length = max_sequence_length or pipeline_defaults(self.pipeline).get("max_sequence_length")
        self.selected_steps = _check_steps(timesteps)
        self.spaces = _check_spaces(space)
        self.concept_modulation = _check_modulation(concept_modulation, self.adapter)
        self.cfg = check_cfg(cfg)
        self.softmax = bool(softmax)
        self.concept_self_attention = bool(concept_self_attention)
        self.concept_cross_attention = bool(concept_cross_attention)
        self.keep_vectors = bool(keep_vectors)
        self.concept_embeds = self._encode(concept_embeds)
        self.groups = ConceptGroups(tuple(self.concepts), tuple(int(e.shape[0]) for e in self.concept_embeds))
        _warn_about_encodings(self.concepts, self.concept_embeds)
        self._signals = CallSignals()
        self._installed = False
        self._rows: torch.Tensor | None = None
        self._reset()

    def _encode(self, concept_embeds: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        width = self.adapter.concept_embed_dim
        if concept_embeds is not None:
            return _check_embeds(concept_embeds, self.concepts, width)
        if self.pipeline is None:
            raise ValueError(f"a bare {type(self.transformer).__name__} needs concept_embeds: one (tokens, {width}) "
                             "tensor per concept")
        return self.adapter.encode_concepts(self.pipeline, self.concepts, self.max_sequence_length)

    # ------------------------------------------------------------------ install
    def __enter__(self) -> "ConceptAttention":
        if self.transformer in _ACTIVE:
            raise RuntimeError("a ConceptAttention session is already installed on this transformer; "
                               "nesting is not supported")
        self._reset()
        try:
            self.adapter.install(self, range(max(self.layers) + 1))
            self.adapter.on_undo(hook_transformer_calls(self._called, self._begin_call, self._end_call))
            self.adapter.on_undo(watch_cache_context(self.transformer, self._signals))
            if self.pipeline is not None:
                self.adapter.on_undo(watch_pipeline_calls(self.pipeline, self._signals))
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
        if self._skipped_steps:
            warnings.warn(f"{len(self._skipped_steps)} of {self._steps_seen} denoising steps were not computed through "
                          "every concept block (a cache such as First Block Cache, TaylorSeer or Pyramid Attention "
                          "Broadcast reused block or attention outputs): their maps were left out; see "
                          "maps.meta['skipped_steps']", stacklevel=2)

    def _reset(self) -> None:
        self._sums = RunningMaps(self.layers, self.spaces)
        self._averaging: torch.Tensor | None = None
        self._call: CallState | None = None
        self._slots: dict[int, BlockSlot] = {}
        self._steps_seen = 0
        self._recorded_steps: list[int] = []
        self._recorded_timesteps: list[float] = []
        self._skipped_steps: list[int] = []
        self._grid: tuple[int, ...] = ()
        self.vectors: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ calls
    def _pipeline_layout(self, call_arguments: inspect.BoundArguments) -> str:
        return self.adapter.pipeline_cfg(self.pipeline, call_arguments)

    def _begin_call(self, args: tuple, kwargs: dict) -> None:
        bound = self.adapter.bind_call(args, kwargs)
        layout = call_layout(self.cfg, self._signals, self._pipeline_layout)
        conditional = is_conditional(layout, self._signals, bound.arguments.get("timestep"))
        if self._signals.pipeline_call is not None and self.adapter.is_auxiliary_call(bound):
            conditional = False
        step = self._steps_seen
        call = CallState(active=conditional and (self.selected_steps is None or step in self.selected_steps), step=step)
        self._steps_seen += int(conditional)
        if call.active:
            self.adapter.verify_processors()
            with torch.no_grad():
                self.adapter.begin_call(bound, call)
                rows = self._concept_rows(bound)
                call.concepts = rows.unsqueeze(0).expand(call.batch_size, -1, -1).contiguous()
            if layout == "batched":
                call.map_rows = _second_half(call.batch_size)
            self._check_grid(call.grid)
            if self._averaging is None or self._averaging.device != rows.device:
                self._averaging = self.groups.averaging_matrix(rows.device)
            for slot in self._slots.values():
                slot.clear()
        self._call = call

    def _concept_rows(self, bound: inspect.BoundArguments) -> torch.Tensor:
        """The concepts as text-stream rows ``(rows, width)``, cached per dtype and device."""
        hidden = bound.arguments.get("hidden_states")  # the latent input's name in almost every diffusers model
        if not isinstance(hidden, torch.Tensor):
            hidden = next(self.transformer.parameters())
        rows = self._rows
        if rows is None or rows.dtype != hidden.dtype or rows.device != hidden.device:
            embeds = torch.cat([e.to(device=hidden.device, dtype=hidden.dtype) for e in self.concept_embeds])
            rows = self._rows = self.adapter.embed_concepts(embeds)
        return rows

    def _check_grid(self, grid: tuple[int, ...]) -> None:
        if self._grid and grid != self._grid:
            raise RuntimeError(f"this session recorded maps on a {self._grid} grid and now sees {grid}; "
                               "use one ConceptAttention session per image size")
        self._grid = grid

    def _end_call(self) -> None:
        """Add a mapped call's maps to the running sums if the concept stream ran through every wrapped block.

        A cache that skipped a block or reused its attention (the block's processor never ran) leaves the
        call incomplete: its step is listed in ``maps.meta["skipped_steps"]`` instead of being recorded.
        """
        call, self._call = self._call, None
        if call is None or not call.active:
            return
        slots = sorted(self._slots.values(), key=lambda slot: slot.index)
        if not all(slot.ran or slot.index in call.skipped_blocks for slot in slots):
            self._skipped_steps.append(call.step)
            return
        for slot in slots:
            if slot.records and slot.maps is not None:
                for space, maps in slot.maps.items():
                    self._sums.add(slot.index, space, maps)
                if slot.vectors is not None:
                    self.vectors.append(_raw_vectors(call.step, slot.index, *slot.vectors))
            slot.clear()
        self._recorded_steps.append(call.step)
        if call.timestep is not None:
            self._recorded_timesteps.append(call.timestep)

    def block_slot(self, block_index: int) -> BlockSlot:
        """The slot of a wrapped block (the recorder protocol): whether it records maps and feeds a later block."""
        slot = self._slots.get(block_index)
        if slot is None:
            slot = self._slots[block_index] = BlockSlot(block_index, records=self.wants_maps(block_index),
                                                        updates=block_index < self.last_layer)
        return slot

    @property
    def concept_sizes(self) -> tuple[int, ...]:
        """Token rows of each concept (the recorder protocol of the adapters)."""
        return self.groups.sizes

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
        return block_index in self.layers

    def attend_and_record(self, slot: BlockSlot, concept_query: torch.Tensor, concept_key: torch.Tensor,
                          concept_value: torch.Tensor, image_key: torch.Tensor, image_value: torch.Tensor,
                          image_output: torch.Tensor) -> torch.Tensor:
        """Concept attention with this session's ablation switches, then :meth:`record`; returns ``o_c``."""
        concept_output = concept_attention(
            concept_query, concept_key, concept_value, image_key, image_value,
            cross_attention=self.concept_cross_attention, self_attention=self.concept_self_attention)
        slot.ran = True
        if slot.records:
            self.record(slot, BlockActivations(
                concept_query=concept_query, concept_key=concept_key, concept_value=concept_value, image_key=image_key,
                image_value=image_value, image_output=image_output, concept_output=concept_output))
        return concept_output

    def record(self, slot: BlockSlot, activations: BlockActivations) -> None:
        """Score one block's activations in every requested space into ``slot`` (summed when the call ends).

        Runs inside the transformer call (possibly compiled): it reads only tensors, the call's
        fixed facts and the slot, and writes only the slot.
        """
        call = self.current_call
        if call is None:
            return
        activations.num_map_tokens = call.num_map_tokens
        if call.map_rows is not None:
            activations = activations.rows(call.map_rows)
        averaging = self._averaging.to(activations.image_output.device)
        softmax = self.softmax and len(self.concepts) > 1
        slot.maps = {space: concept_maps(token_scores(space, activations), averaging, softmax=softmax)
                     for space in self.spaces}
        if self.keep_vectors:
            concept = activations.concept_output
            slot.vectors = (activations.image_output[:, :call.num_map_tokens].flatten(2),
                            None if concept is None else concept.flatten(2))

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
        if self._sums.empty:
            skipped = f"; steps {self._skipped_steps} were skipped by a cache" if self._skipped_steps else ""
            raise RuntimeError("no maps were recorded: call the pipeline or transformer inside the "
                               "`with ConceptAttention(...)` block (and check that `timesteps` selects steps that ran; "
                               "a torch.compile(transformer) wrapper must itself be given to ConceptAttention, or "
                               f"the pipeline holding it){skipped}")
        per_layer_tokens = self._sums.mean(space)  # (L, B, N, C)
        layers, batch, _, concepts = per_layer_tokens.shape
        per_layer = per_layer_tokens.permute(0, 1, 3, 2).reshape(layers, batch, concepts, *self._grid)
        per_layer = per_layer.detach().float().cpu()
        return ConceptMaps(
            tensor=per_layer.mean(dim=0), concepts=list(self.concepts), layers=list(self.layers),
            timesteps=list(self._recorded_timesteps), steps=list(self._recorded_steps), space=space,
            softmax=self.softmax and len(self.concepts) > 1, per_layer=per_layer, meta=self._meta())

    def _meta(self) -> dict[str, Any]:
        notice = model_notice(self.pipeline)
        return {"model": type(self.transformer).__name__, "family": self.adapter.family,
                "concept_tokens": list(self.groups.sizes), "concept_modulation": self.concept_modulation,
                "concept_self_attention": self.concept_self_attention,
                "concept_cross_attention": self.concept_cross_attention, "skipped_steps": list(self._skipped_steps),
                **({"model_notice": notice} if notice else {})}


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile(module)`` wrapper compiles (the module itself if it is no wrapper)."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


def called_module(model: Any) -> nn.Module | None:
    """The module that is called to run the transformer: the transformer, or the ``torch.compile`` wrapper around it."""
    return model if isinstance(model, nn.Module) else getattr(model, "transformer", None)


def _second_half(batch: int) -> slice:
    if batch % 2:
        raise ValueError(f"batched classifier-free guidance needs an even batch, got {batch} rows")
    return slice(batch // 2, batch)


def _raw_vectors(step: int, block_index: int, image: torch.Tensor, concept: torch.Tensor | None) -> dict[str, Any]:
    return {"step": step, "layer": block_index, "image_output": image.detach().cpu(),
            "concept_output": concept.detach().cpu() if concept is not None else None}


def split_model(model: Any) -> tuple[nn.Module, Any]:
    """(transformer, pipeline-or-None) from a diffusers pipeline or a bare transformer; a ``torch.compile``
    wrapper (``OptimizedModule``) is seen through to the transformer it compiles."""
    if isinstance(model, nn.Module):
        return unwrap_compiled(model), None
    transformer = getattr(model, "transformer", None)
    if isinstance(transformer, nn.Module):
        return unwrap_compiled(transformer), model
    raise TypeError("ConceptAttention needs a diffusers pipeline with a `transformer` (e.g. FluxPipeline) or a "
                    f"transformer model (e.g. FluxTransformer2DModel), got {type(model).__name__}")

