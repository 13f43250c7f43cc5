"""SD3 / SD3.5 adapter on tiny random-config models: exactness, a direct oracle, batched CFG,
last block, attn2, skip layers, fused QKV, concept tokens, restore and errors."""

from __future__ import annotations

import copy

import pytest
import torch

import tiny_sd3_chroma as tiny
from concept_attention import ConceptAttention
from contract import AdapterContract
from helpers import (
    as_tokens, check_explain_and_cli, concept_embeds, fused_qkv_runs, grouped_scores,
    record_maps,
)
from helpers import one_thread  # noqa: F401  (autouse: tiny matmuls on two busy cores are ~100x faster single-threaded)

CONCEPTS = ["dog", "tree", "sky"]


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny.sd3_pipeline(seed=0)


@pytest.fixture(scope="module")
def sd35_pipe():
    return tiny.sd3_pipeline(seed=1, dual_attention_layers=(0, 1), qk_norm="rms_norm")


# ---------------------------------------------------------------- oracle
def oracle_maps(transformer, inputs, embeds, layers, modulation="prompt", softmax=True, skip=()):
    """Direct re-implementation, in float64, of the image attention and the concept stream.

    Block inputs are read from a plain run; everything else is recomputed from the block weights:
    the joint [image, text] attention gives o_x, concept queries over [image keys; concept keys]
    give o_c, and the concept rows are updated with the text-stream weights (none after the
    ``context_pre_only`` block). Returns (maps (B, N, C), {block: o_x}).
    """
    inputs_run = dict(inputs)
    skip_layers = list(skip) if skip else None
    captured, handles = {}, []
    for index, block in enumerate(transformer.transformer_blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, i=index: captured.__setitem__(i, kw), with_kwargs=True))
        handles.append(block.attn.to_out[0].register_forward_pre_hook(
            lambda m, a, i=index: captured.__setitem__(("o_x", i), a[0])))
    try:
        with torch.no_grad():
            transformer(**inputs_run, skip_layers=skip_layers)
    finally:
        for h in handles:
            h.remove()
    model = copy.deepcopy(transformer).double()
    with torch.no_grad():
        batch = inputs["hidden_states"].shape[0]
        concepts = model.context_embedder(torch.cat(embeds).double()).expand(batch, -1, -1)
        pooled = inputs["pooled_projections"].double()
        if modulation == "zero":
            pooled = torch.zeros_like(pooled)
        concept_temb = model.time_text_embed(inputs["timestep"].double(), pooled)
        per_layer, image_outputs = [], {}
        for index, block in enumerate(model.transformer_blocks[: max(layers) + 1]):
            if index in skip:
                continue
            kw = captured[index]
            x, text, temb = (kw[k].double() for k in ("hidden_states", "encoder_hidden_states", "temb"))
            attn = block.attn

            def split(t):
                return t.unflatten(-1, (attn.heads, -1))

            def norm(module, t):
                return t if module is None else module(t)

            norm_x = block.norm1(x, emb=temb)[0]
            if block.context_pre_only:
                norm_text = block.norm1_context(text, temb)
            else:
                norm_text = block.norm1_context(text, emb=temb)[0]
            q_x = norm(attn.norm_q, split(attn.to_q(norm_x)))
            k_x = norm(attn.norm_k, split(attn.to_k(norm_x)))
            v_x = split(attn.to_v(norm_x))
            q_t = norm(attn.norm_added_q, split(attn.add_q_proj(norm_text)))
            k_t = norm(attn.norm_added_k, split(attn.add_k_proj(norm_text)))
            v_t = split(attn.add_v_proj(norm_text))
            scale = q_x.shape[-1] ** -0.5
            q, k, v = torch.cat([q_x, q_t], 1), torch.cat([k_x, k_t], 1), torch.cat([v_x, v_t], 1)
            weights = (torch.einsum("bshd,bthd->bhst", q, k) * scale).softmax(-1)
            o_x = torch.einsum("bhst,bthd->bshd", weights, v)[:, : x.shape[1]]
            image_outputs[index] = o_x

            if block.context_pre_only:
                norm_c = block.norm1_context(concepts, concept_temb)
            else:
                norm_c, g_msa, shift, scale_mlp, g_mlp = block.norm1_context(concepts, emb=concept_temb)
            q_c = norm(attn.norm_added_q, split(attn.add_q_proj(norm_c)))
            k_c = norm(attn.norm_added_k, split(attn.add_k_proj(norm_c)))
            v_c = split(attn.add_v_proj(norm_c))
            keys, values = torch.cat([k_x, k_c], 1), torch.cat([v_x, v_c], 1)
            weights = (torch.einsum("brhd,bthd->bhrt", q_c, keys) * scale).softmax(-1)
            o_c = torch.einsum("bhrt,bthd->brhd", weights, values)
            if index in layers:
                per_layer.append(grouped_scores(torch.einsum("bnhd,brhd->bnr", o_x, o_c), embeds, softmax))
            if not block.context_pre_only:
                concepts = concepts + g_msa[:, None] * attn.to_add_out(o_c.flatten(2))
                normed = block.norm2_context(concepts) * (1 + scale_mlp[:, None]) + shift[:, None]
                concepts = concepts + g_mlp[:, None] * block.ff_context(normed)
    for index, o_x in image_outputs.items():  # the oracle's image path is the model's
        model_o_x = captured[("o_x", index)].double().unflatten(-1, (o_x.shape[2], -1))
        assert torch.allclose(o_x, model_o_x, atol=1e-5), index
    return torch.stack(per_layer).mean(0)


# ---------------------------------------------------------------- 1. conformance suite
class SD3Case:
    """Tiny SD3 transformer (SD3.5's qk-norm and attn2 have their own tests); pipeline with batched CFG."""

    oracle_options = {"concept_modulation": "prompt"}
    pipeline_grid = (8, 12)

    def make_transformer(self, seed):
        return tiny.sd3_transformer(seed=seed)

    def make_inputs(self, transformer, seed):
        return tiny.sd3_inputs(transformer, seed=seed)

    def expected_grid(self, inputs):
        return (4, 6)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, modulation="prompt", softmax=softmax)

    def make_pipeline(self):
        return tiny.sd3_pipeline(seed=0)

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2):
        return tiny.generate(pipe, prompt, guidance_scale=7.0 if guidance else 1.0, negative_prompt=negative,
                             height=32, width=48, num_inference_steps=steps)


class TestSD3(SD3Case, AdapterContract):
    pass


def test_sd35_pipeline_with_dual_attention_and_qk_norm_is_bit_identical(sd35_pipe):
    transformer = sd35_pipe.transformer
    assert transformer.transformer_blocks[0].attn2 is not None and transformer.transformer_blocks[0].attn.norm_q
    attn2_processor = transformer.transformer_blocks[0].attn2.processor
    plain = tiny.generate(sd35_pipe, prompt=["a dog", "a red car"])
    with ConceptAttention(sd35_pipe, CONCEPTS, layers=[0, 1, 2]) as ca:
        assert transformer.transformer_blocks[0].attn2.processor is attn2_processor  # attn2 untouched
        assert type(transformer.transformer_blocks[0].attn.processor).__name__ == "SD3ConceptProcessor"
        watched = tiny.generate(sd35_pipe, prompt=["a dog", "a red car"])
    assert torch.equal(plain, watched)
    assert ca.maps.tensor.shape == (2, 3, 8, 8)
    assert not torch.allclose(ca.maps.tensor[0], ca.maps.tensor[1])


# ---------------------------------------------------------------- 2. oracle
@pytest.mark.parametrize("modulation", ["prompt", "zero"])
@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_maps_match_direct_reimplementation(variant, modulation):
    options = {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)} if variant == "sd35" else {}
    transformer = tiny.sd3_transformer(seed=3, layers=3, **options)
    inputs = tiny.sd3_inputs(transformer, seed=4)
    embeds = concept_embeds(transformer, sizes=(1, 3, 2))
    layers = [0, 1, 2]  # includes the context_pre_only last block
    ca = record_maps(transformer, inputs, embeds, layers=layers, concept_modulation=modulation)
    expected = oracle_maps(transformer, inputs, embeds, layers, modulation=modulation)
    got = as_tokens(ca.maps).double()
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_last_block_alone_contributes_a_map():
    transformer = tiny.sd3_transformer(seed=5, layers=3)
    assert transformer.transformer_blocks[-1].context_pre_only
    inputs = tiny.sd3_inputs(transformer)
    embeds = concept_embeds(transformer)
    ca = record_maps(transformer, inputs, embeds, layers=[-1], softmax=False, concept_modulation="prompt")
    assert ca.maps.layers == [2]
    expected = oracle_maps(transformer, inputs, embeds, [2], softmax=False)
    assert torch.allclose(as_tokens(ca.maps).double(), expected, atol=1e-5)


def test_zero_modulation_uses_zero_pooled_vector():
    transformer = tiny.sd3_transformer(seed=6)
    embeds = concept_embeds(transformer)
    inputs = tiny.sd3_inputs(transformer)

    def run(modulation, pooled):
        given = dict(inputs, pooled_projections=pooled)
        return record_maps(transformer, given, embeds, concept_modulation=modulation).maps.tensor

    zero = torch.zeros_like(inputs["pooled_projections"])
    assert torch.allclose(run("zero", zero), run("prompt", zero), atol=1e-6)
    real = inputs["pooled_projections"]
    assert not torch.allclose(run("zero", real), run("prompt", real), atol=1e-4)


# ---------------------------------------------------------------- 4. skip layers
def test_skip_layers_skip_the_concept_update():
    transformer = tiny.sd3_transformer(seed=7, layers=3)
    inputs = tiny.sd3_inputs(transformer)
    embeds = concept_embeds(transformer)
    with torch.no_grad():
        plain = transformer(**inputs, skip_layers=[1]).sample
        with ConceptAttention(
            transformer, ["a", "b", "c"], concept_embeds=embeds, layers=[0, 2], concept_modulation="prompt"
        ) as ca:
            watched = transformer(**inputs, skip_layers=[1]).sample
    assert torch.equal(plain, watched)
    expected = oracle_maps(transformer, inputs, embeds, [0, 2], skip=(1,))
    assert torch.allclose(as_tokens(ca.maps).double(), expected, atol=1e-5)
    not_skipped = oracle_maps(transformer, inputs, embeds, [0, 2])
    assert not torch.allclose(not_skipped, expected, atol=1e-4)


def test_skip_layer_guidance_call_is_not_mapped(sd3_pipe):
    slg = {"skip_guidance_layers": [1], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0}
    plain = tiny.generate(sd3_pipe, num_inference_steps=3, **slg)
    with ConceptAttention(sd3_pipe, CONCEPTS) as ca:
        watched = tiny.generate(sd3_pipe, num_inference_steps=3, **slg)
    assert torch.equal(plain, watched)
    assert ca.maps.steps == [0, 1, 2]  # the extra skip-layer calls are not steps
    # steps 0 and 1 see the same latents with and without skip-layer guidance
    with ConceptAttention(sd3_pipe, CONCEPTS, timesteps=[0, 1]) as with_slg:
        tiny.generate(sd3_pipe, num_inference_steps=3, **slg)
    with ConceptAttention(sd3_pipe, CONCEPTS, timesteps=[0, 1]) as without:
        tiny.generate(sd3_pipe, num_inference_steps=3)
    assert torch.allclose(with_slg.maps.tensor, without.maps.tensor, atol=1e-6)


# ---------------------------------------------------------------- 5. fused QKV
@pytest.mark.parametrize("fuse_inside", [False, True])
def test_fused_qkv(fuse_inside):
    from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0

    transformer = tiny.sd3_transformer(seed=8)
    inputs = tiny.sd3_inputs(transformer)
    reference, fused, (out, out_again), plain = fused_qkv_runs(
        transformer, inputs, concept_embeds(transformer), fuse_inside, calls=2
    )
    assert torch.equal(out, plain) and torch.equal(out_again, plain)
    processors = transformer.attn_processors
    assert all(type(p) is FusedJointAttnProcessor2_0 for p in processors.values())
    assert all(type(p) is JointAttnProcessor2_0 for p in transformer.original_attn_processors.values())
    assert torch.allclose(fused.maps.tensor, reference.maps.tensor, atol=1e-5)
    assert fused.maps.steps == [0, 1]
    transformer.unfuse_qkv_projections()
    assert all(type(p) is JointAttnProcessor2_0 for p in transformer.attn_processors.values())
    for block in transformer.transformer_blocks:
        modules = [block.attn.to_k, block.attn.to_v, block.attn.to_qkv, block.attn.to_out[0]]
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


def test_processor_replaced_by_unknown_one_while_installed_is_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    transformer = tiny.sd3_transformer(seed=9)
    inputs = tiny.sd3_inputs(transformer)
    with torch.no_grad(), pytest.raises(RuntimeError, match="replaced by AttnProcessor2_0"):
        with ConceptAttention(transformer, ["a"], concept_embeds=concept_embeds(transformer, sizes=(1,))):
            transformer.transformer_blocks[1].attn.processor = AttnProcessor2_0()
            transformer(**inputs)


# ---------------------------------------------------------------- 6. concept tokens
def test_concept_token_choice(sd3_pipe):
    concepts = ["dog", "traffic light"]
    clip_length = sd3_pipe.tokenizer_max_length
    with torch.no_grad():
        embeds = sd3_pipe.encode_prompt(concepts, None, None, do_classifier_free_guidance=False,
                                        max_sequence_length=16)[0]
    expected = {
        "clip": [embeds[0, 1:2], embeds[1, 1:3]],
        "t5": [embeds[0, clip_length:clip_length + 1], embeds[1, clip_length:clip_length + 2]],
    }
    expected["both"] = [torch.cat([c, t]) for c, t in zip(expected["clip"], expected["t5"])]
    try:
        for choice, rows in expected.items():
            sd3_pipe.concept_attention_defaults = {"sd3_concept_tokens": choice}
            ca = ConceptAttention(sd3_pipe, concepts, max_sequence_length=16)
            assert [e.shape[0] for e in ca.concept_embeds] == [r.shape[0] for r in rows], choice
            assert all(torch.allclose(e, r.float(), atol=1e-6) for e, r in zip(ca.concept_embeds, rows)), choice
        sd3_pipe.concept_attention_defaults = {"sd3_concept_tokens": "bert"}
        with pytest.raises(ValueError, match="sd3_concept_tokens"):
            ConceptAttention(sd3_pipe, concepts)
    finally:
        sd3_pipe.concept_attention_defaults = {}
    ca = ConceptAttention(sd3_pipe, concepts, max_sequence_length=16)  # default: CLIP rows
    assert all(torch.allclose(e, r.float(), atol=1e-6) for e, r in zip(ca.concept_embeds, expected["clip"]))


def test_pipeline_without_t5():
    pipe = tiny.sd3_pipeline(seed=3, t5=False)
    plain = tiny.generate(pipe)
    with ConceptAttention(pipe, CONCEPTS) as ca:
        watched = tiny.generate(pipe)
    assert torch.equal(plain, watched) and ca.maps.tensor.shape == (1, 3, 8, 8)
    pipe.concept_attention_defaults = {"sd3_concept_tokens": "t5"}
    with pytest.raises(ValueError, match="text_encoder_3=None"):
        ConceptAttention(pipe, CONCEPTS)


# ---------------------------------------------------------------- 8. explain, generate, CLI
def test_explain_and_cli_accept_sd3_pipelines(tmp_path):
    generated = check_explain_and_cli(tiny.sd3_pipeline(seed=4), tmp_path, {"sd3_concept_tokens": "both"})
    assert generated.meta["family"] == "sd3"
    assert generated.meta["concept_tokens"] == [2, 2]  # "both": CLIP row + T5 row per word


def test_session_on_the_bare_transformer_reads_the_conditional_half_when_told(sd3_pipe):
    with ConceptAttention(sd3_pipe, CONCEPTS, timesteps=[0]) as on_pipe:
        tiny.generate(sd3_pipe, guidance_scale=5.0)
    embeds = on_pipe.concept_embeds
    with ConceptAttention(sd3_pipe.transformer, CONCEPTS, concept_embeds=embeds, timesteps=[0]) as unknown:
        tiny.generate(sd3_pipe, guidance_scale=5.0)
    assert unknown.maps.tensor.shape[0] == 2  # a bare transformer cannot know the batch is [uncond, cond]
    with ConceptAttention(sd3_pipe.transformer, CONCEPTS, concept_embeds=embeds, timesteps=[0],
                          cfg="batched") as on_model:
        tiny.generate(sd3_pipe, guidance_scale=5.0)
    assert on_model.maps.tensor.shape == (1, 3, 8, 8)
    assert torch.allclose(on_model.maps.tensor, on_pipe.maps.tensor, atol=1e-6)


def test_processor_of_another_kind_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    transformer = tiny.sd3_transformer(seed=11)
    transformer.transformer_blocks[1].attn.processor = AttnProcessor2_0()
    with pytest.raises(TypeError, match=r"transformer_blocks\.1\.attn uses AttnProcessor2_0"):
        with ConceptAttention(transformer, ["a"], concept_embeds=[torch.zeros(1, 32)]):
            pass
    with pytest.raises(ValueError, match=r"expected \(tokens, 32\)"):
        ConceptAttention(transformer, ["a"], concept_embeds=[torch.zeros(1, 7)])
