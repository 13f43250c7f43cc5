"""Chroma adapter on tiny random-config models: exactness with a padding mask, the mask-formulation
oracle, sequential CFG, per-block modulation, concept encoding, restore."""

from __future__ import annotations

import pytest
import torch

import tiny_sd3_chroma as tiny
from concept_attention import ConceptAttention

CONCEPTS = ["dog", "tree", "sky"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on two busy cores are ~100x faster single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chroma_pipe():
    return tiny.chroma_pipeline(seed=0)


def concept_embeds(transformer, sizes=(1, 2, 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, transformer.config.joint_attention_dim, generator=g) for n in sizes]


def as_tokens(maps):
    b, c, h, w = maps.tensor.shape
    return maps.tensor.reshape(b, c, h * w).permute(0, 2, 1)


class _IsolatingProcessor:
    """The block's own processor with an extra additive mask isolating the appended concept rows."""

    def __init__(self, inner, isolation):
        self.inner, self.isolation = inner, isolation

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        mask = self.isolation if attention_mask is None else attention_mask + self.isolation
        return self.inner(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


def oracle_maps(transformer, inputs, embeds, layers, softmax=True, space="output"):
    """Mask formulation (as for FLUX.1): concepts appended to the prompt rows; an additive mask
    stops prompt and image rows from seeing them and them from seeing the prompt. Chroma's own
    padding mask is kept for prompt/image rows (concept rows are unpadded)."""
    text = inputs["encoder_hidden_states"].shape[1]
    rows = sum(e.shape[0] for e in embeds)
    image = inputs["hidden_states"].shape[1]
    total = text + rows + image
    blocked = torch.zeros(total, total, dtype=torch.bool)
    concept = slice(text, text + rows)
    blocked[:, concept] = True
    blocked[concept, concept] = False
    blocked[concept, :text] = True
    isolation = torch.zeros(total, total).masked_fill(blocked, float("-inf"))
    batch = inputs["hidden_states"].shape[0]
    oracle_inputs = dict(inputs)
    oracle_inputs["encoder_hidden_states"] = torch.cat(
        [inputs["encoder_hidden_states"], torch.cat(embeds).expand(batch, -1, -1)], dim=1)
    oracle_inputs["txt_ids"] = torch.zeros(text + rows, 3)
    mask = inputs.get("attention_mask")
    if mask is not None:
        oracle_inputs["attention_mask"] = torch.cat([mask[:, :text], torch.ones(batch, rows), mask[:, text:]], 1)
    captured, handles, originals = {}, [], []
    for index, block in enumerate(transformer.transformer_blocks):
        attn = block.attn
        originals.append(attn.processor)
        attn.processor = _IsolatingProcessor(attn.processor, isolation)
        handles.append(attn.to_out[0].register_forward_pre_hook(
            lambda m, a, i=index: captured.__setitem__(("x", i), a[0])))
        handles.append(attn.to_add_out.register_forward_pre_hook(
            lambda m, a, i=index: captured.__setitem__(("c", i), a[0][:, text:])))
        handles.append(attn.to_v.register_forward_hook(
            lambda m, a, o, i=index: captured.__setitem__(("vx", i), o)))
        handles.append(attn.add_v_proj.register_forward_hook(
            lambda m, a, o, i=index: captured.__setitem__(("vc", i), o[:, text:])))
    try:
        with torch.no_grad():
            transformer(**oracle_inputs)
    finally:
        for h in handles:
            h.remove()
        for block, original in zip(transformer.transformer_blocks, originals):
            block.attn.processor = original
    per_layer = []
    for layer in layers:
        key_x, key_c = ("x", "c") if space == "output" else ("vx", "vc")
        scores = torch.einsum("bnd,brd->bnr", captured[(key_x, layer)].double(), captured[(key_c, layer)].double())
        columns, start = [], 0
        for e in embeds:
            columns.append(scores[:, :, start:start + e.shape[0]].mean(-1))
            start += e.shape[0]
        grouped = torch.stack(columns, -1)
        per_layer.append(grouped.softmax(-1) if softmax else grouped)
    return torch.stack(per_layer).mean(0)


# ---------------------------------------------------------------- 1. exactness
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_pipeline_output_is_bit_identical(chroma_pipe, guidance):
    prompts = ["a dog", "a red car in the sky"]  # different lengths: a padding mask per row
    plain = tiny.generate(chroma_pipe, prompts, guidance_scale=guidance, height=32, width=48)
    with ConceptAttention(chroma_pipe, CONCEPTS) as ca:
        watched = tiny.generate(chroma_pipe, prompts, guidance_scale=guidance, height=32, width=48)
    assert torch.equal(plain, watched)
    maps = ca.maps
    assert maps.tensor.shape == (2, 3, 8, 12) and maps.steps == [0, 1]
    assert torch.allclose(maps.tensor.sum(1), torch.ones(2, 8, 12), atol=1e-5)
    assert maps.meta["family"] == "chroma"


def test_bare_transformer_with_padding_mask_is_bit_identical():
    transformer = tiny.chroma_transformer(seed=2)
    inputs = tiny.chroma_inputs(transformer)
    with torch.no_grad():
        plain = transformer(**inputs).sample
        with ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=concept_embeds(transformer)) as ca:
            watched = transformer(**inputs).sample
            transformer(**inputs)  # direct calls at one timestep are all conditional
    assert torch.equal(plain, watched)
    assert ca.maps.tensor.shape == (2, 3, 4, 6) and ca.maps.steps == [0, 1]


# ---------------------------------------------------------------- 2. oracle
@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("padded", [2, 0])
def test_maps_match_mask_formulation_oracle(softmax, padded):
    transformer = tiny.chroma_transformer(seed=3)
    inputs = tiny.chroma_inputs(transformer, padded=padded, seed=4)
    embeds = concept_embeds(transformer, sizes=(1, 3, 2))
    layers = [0, 2]
    with torch.no_grad(), ConceptAttention(
        transformer, ["a", "b", "c"], concept_embeds=embeds, layers=layers, softmax=softmax,
        space=["output", "value"],
    ) as ca:
        transformer(**inputs)
    for space in ("output", "value"):
        expected = oracle_maps(transformer, inputs, embeds, layers, softmax=softmax, space=space)
        got = as_tokens(ca.maps_for(space)).double()
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (space, (got - expected).abs().max())


def test_padding_changes_the_image_but_is_not_exposed_to_concepts():
    transformer = tiny.chroma_transformer(seed=5)
    embeds = concept_embeds(transformer)
    results = {}
    for padded in (0, 2):
        inputs = tiny.chroma_inputs(transformer, padded=padded)
        with torch.no_grad(), ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=embeds) as ca:
            transformer(**inputs)
        results[padded] = ca.maps.tensor
    # row 1 has no padding in either run: identical maps; row 0's image changed with its mask
    assert torch.allclose(results[0][1], results[2][1], atol=1e-6)
    assert not torch.allclose(results[0][0], results[2][0], atol=1e-4)


def test_modulation_options_coincide():
    transformer = tiny.chroma_transformer(seed=6)
    inputs = tiny.chroma_inputs(transformer)
    embeds = concept_embeds(transformer)
    maps = []
    for modulation in ("zero", "prompt"):
        with torch.no_grad(), ConceptAttention(
            transformer, ["a", "b", "c"], concept_embeds=embeds, concept_modulation=modulation
        ) as ca:
            transformer(**inputs)
        maps.append(ca.maps.tensor)
    assert torch.equal(maps[0], maps[1])


# ---------------------------------------------------------------- 3. sequential CFG
def test_sequential_cfg_reads_the_first_call_per_timestep(chroma_pipe):
    runs = []
    for negative in ("a cat", "grass and sky"):
        with ConceptAttention(chroma_pipe, CONCEPTS, timesteps=[0]) as ca:
            tiny.generate(chroma_pipe, negative_prompt=negative, guidance_scale=4.0, num_inference_steps=3)
        runs.append(ca)
    assert runs[0].steps == [0]
    assert torch.allclose(runs[0].maps.tensor, runs[1].maps.tensor, atol=1e-6)
    with ConceptAttention(chroma_pipe, CONCEPTS, timesteps=[0]) as no_cfg:
        tiny.generate(chroma_pipe, guidance_scale=1.0, num_inference_steps=3)
    assert torch.allclose(runs[0].maps.tensor, no_cfg.maps.tensor, atol=1e-6)
    with ConceptAttention(chroma_pipe, CONCEPTS) as every_step:
        tiny.generate(chroma_pipe, negative_prompt="a cat", guidance_scale=4.0, num_inference_steps=3)
    assert every_step.steps == [0, 1, 2]
    with ConceptAttention(chroma_pipe, CONCEPTS, timesteps=[0]) as other:
        tiny.generate(chroma_pipe, "a red car in the sky", negative_prompt="a cat", guidance_scale=4.0,
                      num_inference_steps=3)
    assert not torch.allclose(other.maps.tensor, runs[0].maps.tensor, atol=1e-4)


# ---------------------------------------------------------------- 4. concepts
def test_concepts_are_encoded_with_the_pipeline_and_keep_word_pieces(chroma_pipe):
    with torch.no_grad():
        embeds = chroma_pipe.encode_prompt(["dog", "traffic light"], do_classifier_free_guidance=False,
                                           max_sequence_length=16)[0]
    ca = ConceptAttention(chroma_pipe, ["dog", "traffic light"], max_sequence_length=16)
    assert ca.groups.sizes == (1, 2)
    assert torch.allclose(ca.concept_embeds[0], embeds[0, :1], atol=1e-6)
    assert torch.allclose(ca.concept_embeds[1], embeds[1, :2], atol=1e-6)


# ---------------------------------------------------------------- 5. restore and errors
def snapshot(transformer):
    processors = dict(transformer.attn_processors)
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in transformer.named_modules()}
    return processors, hooks, set(transformer.__dict__)


def test_everything_restored_and_unknown_processor_refused():
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    transformer = tiny.chroma_transformer(seed=7)
    inputs = tiny.chroma_inputs(transformer)
    before = snapshot(transformer)
    with torch.no_grad(), ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=concept_embeds(transformer)):
        assert transformer.transformer_blocks[2].norm1_context._forward_pre_hooks
        transformer(**inputs)
    after = snapshot(transformer)
    assert all(after[0][k] is before[0][k] for k in before[0])
    assert after[1] == before[1] and after[2] == before[2]
    transformer.transformer_blocks[1].attn.processor = FluxIPAdapterAttnProcessor(32, 32)
    with pytest.raises(TypeError, match=r"transformer_blocks\.1\.attn uses FluxIPAdapterAttnProcessor"):
        with ConceptAttention(transformer, ["a"], concept_embeds=[torch.zeros(1, 32)]):
            pass
    assert not transformer.transformer_blocks[0].norm1_context._forward_pre_hooks


# ---------------------------------------------------------------- 6. explain, generate, CLI
def test_explain_and_cli_accept_chroma_pipelines(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from concept_attention import ConceptMaps, explain
    from concept_attention.cli import main

    pipe = tiny.chroma_pipeline(seed=4)
    pipe.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "concept_attention.json").write_text(
        json.dumps({"size": 32, "num_inference_steps": 2, "max_sequence_length": 16}))
    picture = Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype("uint8"))
    pipe.default_sample_size = 16
    maps = explain(pipe, picture, ["dog", "sky"], prompt="a dog", num_samples=2, max_sequence_length=16)
    assert maps.tensor.shape == (1, 2, 8, 13) and maps.meta["model_size"] == [52, 32]
    assert torch.allclose(maps.tensor.sum(1), torch.ones(1, 8, 13), atol=1e-5)
    picture.save(tmp_path / "photo.png")
    model = str(tmp_path / "model")
    assert main(["generate", "a dog by a tree", "--concepts", "dog,tree", "--model", model, "--out",
                 str(tmp_path / "gen"), "--device", "cpu"]) == 0
    generated = ConceptMaps.load(tmp_path / "gen")
    assert generated.tensor.shape == (1, 2, 8, 8) and generated.meta["family"] == "chroma"
    assert main(["explain", str(tmp_path / "photo.png"), "--concepts", "dog,sky", "--model", model, "--out",
                 str(tmp_path / "exp"), "--device", "cpu"]) == 0
    assert ConceptMaps.load(tmp_path / "exp").tensor.shape == (1, 2, 8, 13)


def test_fused_qkv_gives_same_maps():
    transformer = tiny.chroma_transformer(seed=8)
    inputs = tiny.chroma_inputs(transformer)
    embeds = concept_embeds(transformer)
    with torch.no_grad():
        with ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=embeds) as reference:
            transformer(**inputs)
        transformer.fuse_qkv_projections()
        plain = transformer(**inputs).sample
        with ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=embeds) as fused:
            watched = transformer(**inputs).sample
    assert transformer.transformer_blocks[0].attn.fused_projections
    assert torch.equal(plain, watched)
    assert torch.allclose(fused.maps.tensor, reference.maps.tensor, atol=1e-5)


def test_session_on_the_bare_transformer_still_reads_the_conditional_call(chroma_pipe):
    with ConceptAttention(chroma_pipe, CONCEPTS) as on_pipe:
        tiny.generate(chroma_pipe, negative_prompt="a cat", guidance_scale=4.0)
    embeds = on_pipe.concept_embeds
    with ConceptAttention(chroma_pipe.transformer, CONCEPTS, concept_embeds=embeds) as on_model:
        tiny.generate(chroma_pipe, negative_prompt="a cat", guidance_scale=4.0)
    assert on_model.steps == [0, 1]
    assert torch.allclose(on_model.maps.tensor, on_pipe.maps.tensor, atol=1e-6)
