"""Shared pieces of the integration tests (one module per mechanism people run big DiTs with).

Every test compares a run *with* the mechanism and the session to the same run with the mechanism and
without the session (the image must be bit-identical), and the maps to a plain reference: the maps of
a model without the mechanism, or of an independent formulation of what the mechanism computes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

import tiny
from concept_attention import ConceptAttention

CONCEPTS = ["dog", "tree", "sky"]


def flux_pipe(seed: int = 0, layers: int = 4):
    pipe = tiny.flux_pipeline(seed=seed, layers=layers)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps: int = 2, guidance: bool = True, **kwargs) -> torch.Tensor:
    """Latents of a 32 × 48 FLUX.1 image (8 × 12 tokens); true CFG (a conditional and an unconditional call
    per step, named by ``cache_context``) unless ``guidance=False``."""
    if guidance:
        kwargs.setdefault("true_cfg_scale", 3.0)
        kwargs.setdefault("negative_prompt", "a cat")
    return tiny.generate(pipe, "a dog by a tree", height=32, width=48, num_inference_steps=steps, **kwargs)


def watched_run(pipe, run: Callable[[], torch.Tensor], **options) -> tuple[torch.Tensor, ConceptAttention]:
    """``run()`` inside a session on ``pipe``: (its output, the finished session)."""
    with ConceptAttention(pipe, CONCEPTS, **options) as session:
        output = run()
    return output, session


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------- hooks other libraries put on a model
def foreign_hooks(model: torch.nn.Module) -> dict[str, Any]:
    """Everything other libraries hook into a model, per module: torch hooks, diffusers hook registries (names in
    order, and the instance ``forward`` they install), accelerate's ``_hf_hook`` (by kind: the pipeline re-installs
    it after each call), the processors and the module's class."""
    state = {}
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        forward = module.__dict__.get("forward")
        accelerate = getattr(module, "_hf_hook", None)
        state[name] = (
            tuple(module._forward_hooks.values()), tuple(module._forward_pre_hooks.values()),
            tuple(registry._hook_order) if registry is not None else None,
            forward if accelerate is None else type(forward), type(accelerate), getattr(module, "processor", None),
            type(module),
        )
    return state


def assert_foreign_hooks_kept(model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = foreign_hooks(model)
    assert after.keys() == before.keys()
    for name, items in after.items():
        for got, expected in zip(items, before[name]):
            if isinstance(got, tuple):
                assert len(got) == len(expected) and all(g is e for g, e in zip(got, expected)), name
            else:
                assert got is expected or got == expected, name


# ---------------------------------------------------------------- replaying the calls of a run
@contextlib.contextmanager
def recorded_calls(transformer: torch.nn.Module):
    """The keyword arguments of every call of ``transformer`` (cloned tensors), with the ``cache_context`` name."""
    calls: list[tuple[str | None, dict]] = []
    context: list[str | None] = [None]
    original = type(transformer).cache_context

    @contextlib.contextmanager
    def cache_context(name, *args, **kwargs):
        context.append(name)
        try:
            with original(transformer, name, *args, **kwargs):
                yield
        finally:
            context.pop()

    def grab(module, args, kwargs):
        calls.append((context[-1], {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))

    handle = transformer.register_forward_pre_hook(grab, with_kwargs=True)
    transformer.__dict__["cache_context"] = cache_context
    try:
        yield calls
    finally:
        handle.remove()
        transformer.__dict__.pop("cache_context", None)


def replayed_maps(transformer: torch.nn.Module, pipe, calls: list[tuple[str | None, dict]], cfg: str = "none",
                  **options):
    """A session's maps over plain calls of ``transformer`` with the recorded conditional calls' inputs."""
    with torch.no_grad(), ConceptAttention(pipe, CONCEPTS, cfg=cfg, **options) as session:
        for name, kwargs in calls:
            if name != "uncond":
                transformer(**kwargs)
    return session.maps


# ---------------------------------------------------------------- bare FLUX.1 transformers
def concept_rows(transformer, sizes=(1, 2, 1), seed: int = 1) -> list[torch.Tensor]:
    """One random ``(tokens, joint_attention_dim)`` embedding per concept."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, transformer.config.joint_attention_dim, generator=g) for n in sizes]


def bare_run(transformer, inputs, embeds, **options) -> tuple[torch.Tensor, ConceptAttention]:
    """One call of a bare transformer inside a session: (its output, the finished session)."""
    with torch.no_grad(), ConceptAttention(transformer, CONCEPTS, concept_embeds=embeds, **options) as session:
        output = transformer(**inputs).sample
    return output, session


def flux_oracle_maps(transformer, inputs, embeds, layers, modulation_inputs=None) -> torch.Tensor:
    """Maps ``(B, N, C)`` by the mask formulation (concept rows appended to the prompt, isolated by an attention
    mask) with ``concept_modulation="prompt"``: every layer of the model, quantized or not, computes them."""
    from helpers import captured_streams, isolation_mask, oracle_from_captured, with_concepts_appended

    text = inputs["encoder_hidden_states"].shape[1]
    rows = sum(e.shape[0] for e in embeds)
    allowed = isolation_mask(text, rows, inputs["hidden_states"].shape[1])
    oracle_inputs = with_concepts_appended(inputs, embeds)
    oracle_inputs["encoder_hidden_states"] = oracle_inputs["encoder_hidden_states"].to(transformer.dtype)
    oracle_inputs["txt_ids"] = torch.zeros(text + rows, 3)
    with captured_streams(transformer, text) as captured, torch.no_grad():
        transformer(**oracle_inputs, joint_attention_kwargs={"attention_mask": allowed})
    return oracle_from_captured(captured, embeds, layers)


def as_tokens(maps) -> torch.Tensor:
    """Maps as ``(batch, tokens, concepts)``, tokens in grid order."""
    b, c = maps.tensor.shape[:2]
    return maps.tensor.reshape(b, c, -1).permute(0, 2, 1)
