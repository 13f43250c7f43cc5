"""Which calls are mapped (core/calls.py): CFG layouts and the pipeline-call, cache-context and call hooks."""

import inspect

import pytest
import torch

import tiny
from concept_attention.core.calls import (
    CallSignals, call_layout, check_cfg, hook_transformer_calls, is_conditional, watch_cache_context,
    watch_pipeline_calls,
)


def test_layout_choice():
    signals = CallSignals()
    assert call_layout("auto", signals, lambda call: "batched") == "none"
    signals.context_name = "cond"
    assert call_layout("auto", signals, lambda call: "batched") == "context"
    signals.pipeline_call = object()
    assert call_layout("auto", signals, lambda call: "batched") == "batched"
    assert call_layout("sequential", signals, lambda call: "batched") == "sequential"
    with pytest.raises(ValueError, match="cfg must be one of"):
        check_cfg("both")


@pytest.mark.parametrize("name,conditional", [(None, True), ("cond", True), ("uncond", False),
                                              ("cond_uncond", True), ("negative_uncond", False)])
def test_context_names(name, conditional):
    assert is_conditional("context", CallSignals(context_name=name), None) is conditional


def test_sequential_maps_the_first_call_of_each_timestep():
    signals = CallSignals()
    seen = [is_conditional("sequential", signals, torch.tensor([t])) for t in (0.9, 0.9, 0.5, 0.5, 0.1)]
    assert seen == [True, False, True, False, True]
    assert is_conditional("batched", signals, None) and is_conditional("none", signals, None)


def test_pipeline_calls_are_seen_and_the_class_comes_back():
    pipe = tiny.flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kind, signals, seen = type(pipe), CallSignals(), []
    undo = watch_pipeline_calls(pipe, signals)
    assert isinstance(pipe, kind) and type(pipe) is not kind
    assert inspect.signature(type(pipe).__call__) == inspect.signature(kind.__call__)
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append(signals.pipeline_call))
    tiny.generate(pipe, true_cfg_scale=2.0, negative_prompt="a cat")
    handle.remove()
    assert seen and all(call.arguments["true_cfg_scale"] == 2.0 for call in seen)
    assert signals.pipeline_call is None
    undo()
    assert type(pipe) is kind


def test_cache_context_names_are_recorded_and_the_method_comes_back():
    transformer = tiny.flux_transformer()
    signals = CallSignals()
    undo = watch_cache_context(transformer, signals)
    with transformer.cache_context("uncond"):
        assert signals.context_name == "uncond"
    assert signals.context_name is None
    undo()
    assert "cache_context" not in transformer.__dict__


def test_call_hooks_end_a_call_also_after_an_exception():
    transformer, events = tiny.flux_transformer(), []
    undo = hook_transformer_calls(transformer, lambda args, kwargs: events.append("begin"),
                                  lambda: events.append("end"))
    with pytest.raises((TypeError, AttributeError)), torch.no_grad():
        transformer(hidden_states=torch.zeros(1, 4, 16))  # missing inputs: the forward fails
    undo()
    assert events == ["begin", "end"]
    assert not transformer._forward_hooks and not transformer._forward_pre_hooks
