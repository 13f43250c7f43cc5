"""FLUX.1 adapter on tiny random-config models: exactness, oracle, selection, restore, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import FluxPipeline

import tiny
from concept_attention import ConceptAttention
from helpers import (
    as_tokens, assert_matches_oracle, assert_output_unchanged, assert_restored, captured_streams,
    concept_embeds, fused_qkv_runs, isolation_mask, oracle_from_captured, record_maps, snapshot,
    with_concepts_appended,
)

CONCEPTS = ["dog", "tree", "sky", "background"]


# ---------------------------------------------------------------- helpers
def transformer_inputs(transformer, batch=2, height=4, width=6, text=5, seed=0, pooled_zero=False):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    inputs = {
        "hidden_states": torch.randn(batch, height * width, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.zeros(batch, cfg.pooled_projection_dim)
        if pooled_zero
        else torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.full((batch,), 0.6),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, height, width, "cpu", torch.float32),
        "txt_ids": torch.zeros(text, 3),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def oracle_maps(transformer, inputs, embeds, layers, softmax=True, space="output"):
    """Mask formulation: concepts appended to the text stream, isolated by an attention mask."""
    text = inputs["encoder_hidden_states"].shape[1]
    rows = sum(e.shape[0] for e in embeds)
    allowed = isolation_mask(text, rows, inputs["hidden_states"].shape[1])
    oracle_inputs = with_concepts_appended(inputs, embeds)
    oracle_inputs["txt_ids"] = torch.zeros(text + rows, 3)
    with captured_streams(transformer, text) as captured, torch.no_grad():
        transformer(**oracle_inputs, joint_attention_kwargs={"attention_mask": allowed})
    return oracle_from_captured(captured, embeds, layers, softmax=softmax, space=space)


# ---------------------------------------------------------------- 1. exactness
@pytest.mark.parametrize(
    "prompt,size,per_prompt",
    [("a dog by a tree", (32, 32), 1), (["a dog", "a cat on grass"], (32, 48), 2)],
)
def test_pipeline_output_is_bit_identical_and_maps_have_grid(flux_pipe, prompt, size, per_prompt):
    height, width = size
    plain = tiny.generate(flux_pipe, prompt, height=height, width=width, num_images_per_prompt=per_prompt)
    with ConceptAttention(flux_pipe, CONCEPTS) as ca:
        watched = tiny.generate(flux_pipe, prompt, height=height, width=width, num_images_per_prompt=per_prompt)
    assert torch.equal(plain, watched)
    batch = (1 if isinstance(prompt, str) else len(prompt)) * per_prompt
    maps = ca.maps
    assert maps.tensor.dtype == torch.float32
    assert maps.tensor.shape == (batch, len(CONCEPTS), height // 4, width // 4)
    assert torch.allclose(maps.tensor.sum(dim=1), torch.ones(batch, height // 4, width // 4), atol=1e-5)
    assert maps["dog"].shape == (batch, height // 4, width // 4)
    assert maps.steps == [0, 1] and len(maps.timesteps) == 2
    if batch > 1:  # different images give different maps
        assert not torch.allclose(maps.tensor[0], maps.tensor[-1])


def test_bare_transformer_output_is_bit_identical():
    transformer = tiny.flux_transformer(guidance=True)
    inputs = transformer_inputs(transformer)
    ca = assert_output_unchanged(transformer, inputs)
    assert ca.maps.tensor.shape == (2, 3, 4, 6)


# ---------------------------------------------------------------- 2. oracle
@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("guidance", [False, True])
def test_maps_match_mask_formulation_oracle(softmax, guidance):
    transformer = tiny.flux_transformer(seed=3, guidance=guidance)
    inputs = transformer_inputs(transformer, seed=4)
    embeds = concept_embeds(transformer, sizes=(1, 3, 2))
    layers = [1, 3]
    ca = record_maps(transformer, inputs, embeds, layers=layers, softmax=softmax, concept_modulation="prompt",
                     space=["output", "value"])
    assert_matches_oracle(ca, lambda space: oracle_maps(transformer, inputs, embeds, layers, softmax, space))


def test_zero_modulation_uses_zero_pooled_vector():
    transformer = tiny.flux_transformer(seed=5)
    embeds = concept_embeds(transformer)

    def run(inputs, modulation):
        return as_tokens(record_maps(transformer, inputs, embeds, concept_modulation=modulation).maps).double()

    zero_pooled = transformer_inputs(transformer, pooled_zero=True)
    oracle = oracle_maps(transformer, zero_pooled, embeds, layers=[2, 3])
    # With a zero pooled vector the prompt's modulation *is* the zero modulation.
    assert torch.allclose(run(zero_pooled, "zero"), oracle, atol=1e-5)
    real_pooled = transformer_inputs(transformer)
    assert not torch.allclose(run(real_pooled, "zero"), run(real_pooled, "prompt"), atol=1e-4)


# ---------------------------------------------------------------- 3. maps semantics
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


# ---------------------------------------------------------------- CFG and fused QKV
def test_true_cfg_reads_only_the_conditional_call(flux_pipe):
    with ConceptAttention(flux_pipe, CONCEPTS, timesteps=[0]) as plain:
        tiny.generate(flux_pipe)
    runs = []
    for negative in ("a cat", "grass and sky"):
        with ConceptAttention(flux_pipe, CONCEPTS, timesteps=[0]) as ca:
            tiny.generate(flux_pipe, negative_prompt=negative, true_cfg_scale=3.0)
        runs.append(ca.maps)
    assert runs[0].steps == [0]
    assert torch.allclose(runs[0].tensor, plain.maps.tensor, atol=1e-6)
    assert torch.allclose(runs[1].tensor, plain.maps.tensor, atol=1e-6)
    with ConceptAttention(flux_pipe, CONCEPTS, timesteps=[0]) as other_prompt:
        tiny.generate(flux_pipe, "a red car in the sky")
    assert not torch.allclose(other_prompt.maps.tensor, plain.maps.tensor, atol=1e-4)


@pytest.mark.parametrize("fuse_inside", [False, True])
def test_fused_qkv_gives_same_maps(fuse_inside):
    transformer = tiny.flux_transformer(seed=13)
    inputs = transformer_inputs(transformer)
    reference, fused, (out,), plain = fused_qkv_runs(transformer, inputs, concept_embeds(transformer), fuse_inside)
    assert transformer.transformer_blocks[0].attn.fused_projections
    assert torch.equal(out, plain)
    assert torch.allclose(fused.maps.tensor, reference.maps.tensor, atol=1e-5)


# ---------------------------------------------------------------- 4. restore
def test_everything_restored_after_normal_exit_and_exception():
    transformer = tiny.flux_transformer(seed=17)
    inputs = transformer_inputs(transformer)
    before = snapshot(transformer)
    with torch.no_grad(), ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=concept_embeds(transformer)):
        assert any(type(p).__name__ == "FluxConceptProcessor" for p in transformer.attn_processors.values())
        transformer(**inputs)
    assert_restored(transformer, before)

    class Boom(Exception):
        pass

    def explode(module, args):
        raise Boom("raised inside the pipeline")

    before = snapshot(transformer)
    handle = transformer.single_transformer_blocks[0].register_forward_pre_hook(explode)
    with pytest.raises(Boom):
        with torch.no_grad(), ConceptAttention(
            transformer, ["a", "b", "c"], concept_embeds=concept_embeds(transformer)
        ):
            transformer(**inputs)
    handle.remove()
    assert_restored(transformer, before)
    # and the model still runs normally afterwards
    with torch.no_grad():
        transformer(**inputs)


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


def test_nesting_refused_and_unknown_processor_refused():
    transformer = tiny.flux_transformer()
    embeds = [torch.zeros(1, 32)]
    with ConceptAttention(transformer, ["a"], concept_embeds=embeds):
        with pytest.raises(RuntimeError, match="nesting"):
            with ConceptAttention(transformer, ["a"], concept_embeds=embeds):
                pass
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    transformer.transformer_blocks[1].attn.processor = FluxIPAdapterAttnProcessor(32, 32)
    before = snapshot(transformer)
    with pytest.raises(TypeError, match=r"transformer_blocks\.1\.attn uses FluxIPAdapterAttnProcessor"):
        with ConceptAttention(transformer, ["a"], concept_embeds=embeds):
            pass
    assert_restored(transformer, before)


def test_no_maps_without_a_call(flux_pipe):
    with ConceptAttention(flux_pipe, CONCEPTS) as ca:
        pass
    with pytest.raises(RuntimeError, match="no maps were recorded"):
        ca.maps
