"""The session (core/session.py): options and their errors, layer and step selection, spaces and ablations,
multi-token concepts, raw vectors, warnings; run on tiny FLUX.1 models (any family would do)."""

from __future__ import annotations

import pytest
import torch

import tiny
from concept_attention import ConceptAttention
from helpers import assert_restored, concept_embeds, record_maps, snapshot

CONCEPTS = ["dog", "tree", "sky", "background"]


def transformer_inputs(transformer, seed=0):
    return tiny.flux_inputs(transformer, seed=seed)


def test_multi_token_concept_is_mean_of_its_piece_scores():
    transformer = tiny.flux_transformer(seed=7)
    inputs = transformer_inputs(transformer)
    pieces = concept_embeds(transformer, sizes=(1, 1, 1))
    joined = [torch.cat(pieces)]
    with torch.no_grad():
        with ConceptAttention(transformer, ["whole"], concept_embeds=joined, softmax=False) as one:
            transformer(**inputs)
        with ConceptAttention(transformer, ["p1", "p2", "p3"], concept_embeds=pieces, softmax=False) as three:
            transformer(**inputs)
    assert torch.allclose(one.maps.tensor[:, 0], three.maps.tensor.mean(dim=1), atol=1e-5)


def test_pipeline_encodes_multi_token_concepts_and_warns(flux_pipe):
    with pytest.warns(UserWarning, match="skyscraper"):
        ca = ConceptAttention(flux_pipe, ["sky", "skyscraper", "traffic light"])
    assert ca.groups.sizes[0] == 1 and ca.groups.sizes[1] > 4 and ca.groups.sizes[2] == 2


def test_layer_and_timestep_selection(flux_pipe):
    with ConceptAttention(flux_pipe, CONCEPTS, layers=[0, 2, 3], timesteps=[1]) as ca:
        tiny.generate(flux_pipe, num_inference_steps=3)
    maps = ca.maps
    assert maps.layers == [0, 2, 3] and maps.steps == [1] and len(maps.timesteps) == 1
    assert maps.per_layer.shape[0] == 3
    with ConceptAttention(flux_pipe, CONCEPTS, layers=[2], timesteps=[1]) as only:
        tiny.generate(flux_pipe, num_inference_steps=3)
    assert torch.allclose(maps.for_layers([2]).tensor, only.maps.tensor, atol=1e-6)
    assert not torch.allclose(maps.for_layers([0]).tensor, only.maps.tensor, atol=1e-4)
    with ConceptAttention(flux_pipe, CONCEPTS, layers=[-1]) as last:
        tiny.generate(flux_pipe)
    assert last.maps.layers == [3]


def test_spaces_and_ablations_run_and_differ():
    transformer = tiny.flux_transformer(seed=11)
    inputs = transformer_inputs(transformer)
    embeds = concept_embeds(transformer)
    results = {}
    settings = {
        "output": {},
        "cross": {"space": "cross_attention"},
        "value": {"space": "value"},
        "no_softmax": {"softmax": False},
        "cross_only": {"concept_self_attention": False},
        "self_only": {"concept_cross_attention": False},
        "neither": {"concept_self_attention": False, "concept_cross_attention": False},
    }
    for name, options in settings.items():
        results[name] = record_maps(transformer, inputs, embeds, **options).maps.tensor
        assert torch.isfinite(results[name]).all()
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(results[a], results[b], atol=1e-5), (a, b)
    # value-space maps ignore the attention pattern, so the concept-attention ablations
    # change output-space maps but the softmax maps always sum to one
    for name in ("output", "cross", "value", "cross_only", "self_only", "neither"):
        assert torch.allclose(results[name].sum(1), torch.ones_like(results[name][:, 0]), atol=1e-5)


def test_single_concept_turns_softmax_off(flux_pipe):
    with ConceptAttention(flux_pipe, ["dog"]) as ca:
        tiny.generate(flux_pipe)
    assert ca.maps.softmax is False
    assert not torch.allclose(ca.maps.tensor, torch.ones_like(ca.maps.tensor))


def test_keep_vectors(flux_pipe):
    with ConceptAttention(flux_pipe, ["dog", "tree"], keep_vectors=True, layers=[3]) as ca:
        tiny.generate(flux_pipe)
    assert len(ca.vectors) == 2
    first = ca.vectors[0]
    assert first["image_output"].shape == (1, 64, 32) and first["concept_output"].shape == (1, 2, 32)


# ---------------------------------------------------------------- restore and errors
def test_pipeline_restored_after_exception(flux_pipe):
    before = snapshot(flux_pipe.transformer)
    with pytest.raises(ValueError):
        with ConceptAttention(flux_pipe, CONCEPTS):
            tiny.generate(flux_pipe, height=30, width=32, num_inference_steps=-1)
    assert_restored(flux_pipe.transformer, before)


# ---------------------------------------------------------------- 5. errors
@pytest.mark.parametrize(
    "concepts,error,match",
    [
        ([], ValueError, "empty"),
        (["dog", " "], ValueError, "empty string"),
        (["dog", "Dog"], ValueError, "duplicate"),
        ("dog", TypeError, "list of strings"),
        (["dog", 3], TypeError, "must be a string"),
    ],
)
def test_bad_concepts(flux_pipe, concepts, error, match):
    with pytest.raises(error, match=match):
        ConceptAttention(flux_pipe, concepts)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"layers": [4]}, ValueError, "out of range"),
        ({"layers": [-5]}, ValueError, "out of range"),
        ({"layers": []}, ValueError, "empty"),
        ({"layers": ["1"]}, TypeError, "integers"),
        ({"timesteps": [-1]}, ValueError, "step indices"),
        ({"space": "attention"}, ValueError, "unknown space"),
        ({"concept_modulation": "clip"}, ValueError, "concept_modulation"),
    ],
)
def test_bad_options(flux_pipe, options, error, match):
    with pytest.raises(error, match=match):
        ConceptAttention(flux_pipe, CONCEPTS, **options)


def test_unsupported_models_and_pipelines():
    with pytest.raises(TypeError, match="supported transformer classes: .*FluxTransformer2DModel"):
        ConceptAttention(torch.nn.Linear(2, 2), ["a"], concept_embeds=[torch.zeros(1, 2)])
    with pytest.raises(TypeError, match="needs a diffusers pipeline"):
        ConceptAttention(object(), ["a"])
    transformer = tiny.flux_transformer()
    with pytest.raises(ValueError, match="concept_embeds"):
        ConceptAttention(transformer, ["a"])
    with pytest.raises(ValueError, match=r"expected \(tokens, 32\)"):
        ConceptAttention(transformer, ["a"], concept_embeds=[torch.zeros(2, 7)])
    with pytest.raises(ValueError, match="2 concept_embeds for 1 concepts"):
        ConceptAttention(transformer, ["a"], concept_embeds=[torch.zeros(1, 32)] * 2)


def test_no_maps_without_a_call(flux_pipe):
    with ConceptAttention(flux_pipe, CONCEPTS) as ca:
        pass
    with pytest.raises(RuntimeError, match="no maps were recorded"):
        ca.maps
