"""Chroma adapter on tiny random-config models: exactness with a padding mask, the mask-formulation
oracle, sequential CFG, per-block modulation, concept encoding, restore."""

from __future__ import annotations

import pytest
import torch

import tiny_sd3_chroma as tiny
from concept_attention import ConceptAttention
from contract import AdapterContract
from helpers import (
    assert_matches_oracle, captured_streams, check_explain_and_cli, concept_embeds, isolation_mask,
    oracle_from_captured, record_maps, snapshot, with_concepts_appended,
)
from helpers import one_thread  # noqa: F401  (autouse: tiny matmuls on two busy cores are ~100x faster single-threaded)

CONCEPTS = ["dog", "tree", "sky"]


@pytest.fixture(scope="module")
def chroma_pipe():
    return tiny.chroma_pipeline(seed=0)


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
    blocked = ~isolation_mask(text, rows, inputs["hidden_states"].shape[1])
    isolation = torch.zeros(blocked.shape).masked_fill(blocked, float("-inf"))
    batch = inputs["hidden_states"].shape[0]
    oracle_inputs = with_concepts_appended(inputs, embeds)
    oracle_inputs["txt_ids"] = torch.zeros(text + rows, 3)
    mask = inputs.get("attention_mask")
    if mask is not None:
        oracle_inputs["attention_mask"] = torch.cat([mask[:, :text], torch.ones(batch, rows), mask[:, text:]], 1)
    originals = [block.attn.processor for block in transformer.transformer_blocks]
    for block in transformer.transformer_blocks:
        block.attn.processor = _IsolatingProcessor(block.attn.processor, isolation)
    try:
        with captured_streams(transformer, text) as captured, torch.no_grad():
            transformer(**oracle_inputs)
    finally:
        for block, original in zip(transformer.transformer_blocks, originals):
            block.attn.processor = original
    return oracle_from_captured(captured, embeds, layers, softmax=softmax, space=space)


# ---------------------------------------------------------------- 1. conformance suite
class ChromaCase:
    """Tiny Chroma models: a T5 padding mask in the bare inputs, sequential CFG in the pipeline."""

    oracle_spaces = ("output", "value")
    pipeline_grid = (8, 12)

    def make_transformer(self, seed):
        return tiny.chroma_transformer(seed=seed)

    def make_inputs(self, transformer, seed):
        return tiny.chroma_inputs(transformer, seed=seed)

    def expected_grid(self, inputs):
        return (4, 6)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, softmax, space)

    def make_pipeline(self):
        return tiny.chroma_pipeline(seed=0)

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2):
        return tiny.generate(pipe, prompt, guidance_scale=4.0 if guidance else 1.0, negative_prompt=negative,
                             height=32, width=48, num_inference_steps=steps)


class TestChroma(ChromaCase, AdapterContract):
    pass


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_pipeline_with_padded_prompts_is_bit_identical(chroma_pipe, guidance):
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
    ca = record_maps(transformer, inputs, embeds, layers=layers, softmax=softmax, space=["output", "value"])
    assert_matches_oracle(ca, lambda space: oracle_maps(transformer, inputs, embeds, layers, softmax, space))


def test_padding_changes_the_image_but_is_not_exposed_to_concepts():
    transformer = tiny.chroma_transformer(seed=5)
    embeds = concept_embeds(transformer)
    results = {}
    for padded in (0, 2):
        inputs = tiny.chroma_inputs(transformer, padded=padded)
        results[padded] = record_maps(transformer, inputs, embeds).maps.tensor
    # row 1 has no padding in either run: identical maps; row 0's image changed with its mask
    assert torch.allclose(results[0][1], results[2][1], atol=1e-6)
    assert not torch.allclose(results[0][0], results[2][0], atol=1e-4)


def test_modulation_options_coincide():
    transformer = tiny.chroma_transformer(seed=6)
    inputs = tiny.chroma_inputs(transformer)
    embeds = concept_embeds(transformer)
    maps = []
    for modulation in ("zero", "prompt"):
        maps.append(record_maps(transformer, inputs, embeds, concept_modulation=modulation).maps.tensor)
    assert torch.equal(maps[0], maps[1])


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
def test_modulation_hooks_removed_and_ip_adapter_refused():
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
    generated = check_explain_and_cli(tiny.chroma_pipeline(seed=4), tmp_path, {}, prompt="a dog")
    assert generated.meta["family"] == "chroma"


def test_sequential_cfg_counts_one_step_per_timestep(chroma_pipe):
    with ConceptAttention(chroma_pipe, CONCEPTS) as every_step:
        tiny.generate(chroma_pipe, negative_prompt="a cat", guidance_scale=4.0, num_inference_steps=3)
    assert every_step.steps == [0, 1, 2]


def test_session_on_the_bare_transformer_reads_the_conditional_call_when_told(chroma_pipe):
    with ConceptAttention(chroma_pipe, CONCEPTS) as on_pipe:
        tiny.generate(chroma_pipe, negative_prompt="a cat", guidance_scale=4.0)
    embeds = on_pipe.concept_embeds
    with ConceptAttention(chroma_pipe.transformer, CONCEPTS, concept_embeds=embeds) as unknown:
        tiny.generate(chroma_pipe, negative_prompt="a cat", guidance_scale=4.0)
    assert unknown.steps == [0, 1, 2, 3]  # a bare transformer cannot tell the negative prompt's calls apart
    with ConceptAttention(chroma_pipe.transformer, CONCEPTS, concept_embeds=embeds, cfg="sequential") as on_model:
        tiny.generate(chroma_pipe, negative_prompt="a cat", guidance_scale=4.0)
    assert on_model.steps == [0, 1]
    assert torch.allclose(on_model.maps.tensor, on_pipe.maps.tensor, atol=1e-6)
