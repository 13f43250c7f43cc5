"""Offloading and other hooks on the model: diffusers' group offloading (block- and leaf-level, CPU → CPU, which
runs the same onload/offload hooks as CPU → GPU without streams), ``enable_model_cpu_offload`` (accelerate hooks),
layerwise casting (bf16 storage, fp32 compute), and user hooks, all beside the session's own.

The concept stream calls the text-stream layers through their modules, so every hook that onloads or casts
a layer's weights runs for it too. Leaving the session leaves every foreign hook in place.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from concept_attention import ConceptAttention
from mechanisms import (
    CONCEPTS, as_tokens, assert_foreign_hooks_kept, bare_run, concept_rows, flux_oracle_maps, flux_pipe,
    foreign_hooks, generate, max_difference, watched_run,
)

OFFLOADING = {
    "group_block_level": lambda pipe: pipe.transformer.enable_group_offload(
        onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
        num_blocks_per_group=1),
    "group_leaf_level": lambda pipe: pipe.transformer.enable_group_offload(
        onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="leaf_level"),
    "model_cpu_offload": lambda pipe: pipe.enable_model_cpu_offload(device="cpu"),
}


@pytest.fixture(scope="module")
def reference():
    """Output and session maps of the plain pipeline."""
    pipe = flux_pipe()
    plain = generate(pipe)
    _, session = watched_run(pipe, lambda: generate(pipe))
    return plain, session.maps


TEXT_STREAM_MODULES = ("norm1_context", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                       "ff_context")
"""Every text-stream module the concept rows pass through in a dual block that is not the last one."""


def add_user_hooks(pipe) -> list[str]:
    """A forward pre-hook on the transformer, forward hooks on a block's attention and on every text-stream module
    of block 2 (an onload or cast hook skipped on any of them would show as a missing call)."""
    seen: list[str] = []
    transformer, block = pipe.transformer, pipe.transformer.transformer_blocks[2]
    transformer.register_forward_pre_hook(lambda m, a, kw: seen.append("call"), with_kwargs=True)
    block.attn.register_forward_hook(lambda m, a, o: seen.append("attn"))
    for name in TEXT_STREAM_MODULES:
        block.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: seen.append(name))
    return seen


@pytest.mark.parametrize("mechanism", list(OFFLOADING))
def test_offloading_keeps_the_image_the_maps_and_its_hooks(mechanism, reference):
    plain_reference, maps_reference = reference
    pipe = flux_pipe()
    OFFLOADING[mechanism](pipe)
    seen = add_user_hooks(pipe)
    plain = generate(pipe)
    assert torch.equal(plain, plain_reference)  # CPU → CPU offloading changes nothing
    before = foreign_hooks(pipe.transformer)
    seen.clear()
    watched, session = watched_run(pipe, lambda: generate(pipe))
    assert torch.equal(watched, plain)
    assert torch.equal(session.maps.tensor, maps_reference.tensor)
    assert seen.count("call") == 4 and seen.count("attn") == 4
    for name in TEXT_STREAM_MODULES:  # 4 prompt rows + 2 conditional concept rows: user hooks see both
        assert seen.count(name) == 6, name
    assert_foreign_hooks_kept(pipe.transformer, before)
    assert torch.equal(generate(pipe), plain)  # offloading still works after the session


def test_layerwise_casting_runs_the_concept_stream_through_cast_layers():
    model = tiny.flux_transformer(seed=3)
    inputs, embeds = tiny.flux_inputs(model, seed=4), concept_rows(model)
    _, full_precision = bare_run(model, inputs, embeds, layers=[0, 3], concept_modulation="prompt")
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert model.transformer_blocks[0].attn.add_q_proj.weight.dtype == torch.bfloat16
    before = foreign_hooks(model)
    with torch.no_grad():
        plain = model(**inputs).sample
    watched, session = bare_run(model, inputs, embeds, layers=[0, 3], concept_modulation="prompt")
    assert torch.equal(plain, watched)
    assert_foreign_hooks_kept(model, before)
    oracle = flux_oracle_maps(model, inputs, embeds, [0, 3])
    assert max_difference(as_tokens(session.maps), oracle) < 1e-5  # measured 8e-8
    assert 1e-4 < max_difference(session.maps.tensor, full_precision.maps.tensor) < 1e-2  # bf16 weights: 5e-4


def test_sequential_cpu_offload_where_accelerate_runs_it():
    pipe = flux_pipe()
    pipe.enable_sequential_cpu_offload(device="cpu")
    try:
        plain = generate(pipe)
    except TypeError as error:  # accelerate cannot move parameters to "meta" and back on a CPU-only torch here
        pytest.skip(f"sequential CPU offload does not run on this machine: {error}".splitlines()[0])
    with ConceptAttention(pipe, CONCEPTS) as session:
        watched = generate(pipe)
    assert torch.equal(plain, watched) and session.maps.steps == [0, 1]
