"""FLUX.1 adapter on tiny random-config models: the conformance suite (``FluxCase``) and FLUX.1's own cases:
modulation, multi-token concepts, layer/step selection, spaces and ablations, option errors."""

from __future__ import annotations


import pytest
import torch

import tiny
from concept_attention import ConceptAttention
from contract import AdapterContract
from helpers import (
    as_tokens, assert_restored, captured_streams, concept_embeds, isolation_mask, oracle_from_captured, record_maps,
    snapshot, with_concepts_appended,
)

CONCEPTS = ["dog", "tree", "sky", "background"]


# ---------------------------------------------------------------- helpers
def transformer_inputs(transformer, **options):
    return tiny.flux_inputs(transformer, **options)


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


class FluxCase:
    """Tiny FLUX.1 models for the conformance suite (guidance-embedded transformer, true CFG in the pipeline)."""

    oracle_options = {"concept_modulation": "prompt"}
    oracle_spaces = ("output", "value")
    pipeline_grid = (8, 12)

    def make_transformer(self, seed):
        return tiny.flux_transformer(seed=seed, guidance=True)

    def make_inputs(self, transformer, seed):
        return transformer_inputs(transformer, seed=seed)

    def expected_grid(self, inputs):
        return (4, 6)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, softmax, space)

    def make_pipeline(self):
        return tiny.flux_pipeline(seed=0)

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2):
        cfg = {"true_cfg_scale": 3.0, "negative_prompt": negative} if guidance else {}
        return tiny.generate(pipe, prompt, height=32, width=48, num_inference_steps=steps, **cfg)


class TestFlux(FluxCase, AdapterContract):
    pass


def test_pipeline_batch_of_prompts_gives_one_map_per_image(flux_pipe):
    plain = tiny.generate(flux_pipe, ["a dog", "a cat on grass"], height=32, width=48, num_images_per_prompt=2)
    with ConceptAttention(flux_pipe, CONCEPTS) as ca:
        watched = tiny.generate(flux_pipe, ["a dog", "a cat on grass"], height=32, width=48, num_images_per_prompt=2)
    assert torch.equal(plain, watched)
    assert ca.maps.tensor.shape == (4, len(CONCEPTS), 8, 12) and ca.maps["dog"].shape == (4, 8, 12)
    assert not torch.allclose(ca.maps.tensor[0], ca.maps.tensor[-1])


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


def test_ip_adapter_processor_refused():
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    transformer = tiny.flux_transformer()
    transformer.transformer_blocks[1].attn.processor = FluxIPAdapterAttnProcessor(32, 32)
    before = snapshot(transformer)
    with pytest.raises(TypeError, match=r"transformer_blocks\.1\.attn uses FluxIPAdapterAttnProcessor"):
        with ConceptAttention(transformer, ["a"], concept_embeds=[torch.zeros(1, 32)]):
            pass
    assert_restored(transformer, before)
