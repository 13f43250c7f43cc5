"""FLUX.2 adapter on tiny random-config models: exactness, mask oracle, RoPE policy, template span, refusals."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Pipeline

import tiny_video_flux2 as tv
from concept_attention import ConceptAttention
from concept_attention.adapters.encoding import concept_token_span
from concept_attention.adapters.flux2 import Flux2Adapter
from contract import AdapterContract
from helpers import (
    as_tokens, assert_matches_oracle, assert_output_unchanged, captured_streams, concept_embeds, isolation_mask,
    oracle_from_captured, with_concepts_appended,
)

CONCEPTS = ["dog", "tree", "sky"]


@pytest.fixture(scope="module")
def klein():
    pipe = tv.flux2_klein_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- helpers
def transformer_inputs(transformer, batch=2, height=4, width=6, text=5, seed=0, references=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    latents = torch.zeros(batch, cfg.in_channels, height, width)
    img_ids = Flux2Pipeline._prepare_latent_ids(latents)
    tokens = height * width
    if references:  # reference-image tokens after the generated ones (t = 10), as Flux2Pipeline does
        ref_ids = Flux2Pipeline._prepare_image_ids([torch.zeros(1, cfg.in_channels, 2, references // 2)])
        img_ids = torch.cat([img_ids, ref_ids.expand(batch, -1, -1)], dim=1)
        tokens += references
    encoder = torch.randn(batch, text, cfg.joint_attention_dim, generator=g)
    inputs = {
        "hidden_states": torch.randn(batch, tokens, cfg.in_channels, generator=g),
        "encoder_hidden_states": encoder,
        "timestep": torch.full((batch,), 0.6),
        "img_ids": img_ids,
        "txt_ids": Flux2Pipeline._prepare_text_ids(encoder),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def oracle_maps(transformer, inputs, embeds, layers, positions, num_map_tokens, softmax=True, space="output"):
    """Mask formulation: concept rows appended to the text stream at ``positions``, isolated by a mask."""
    text = inputs["encoder_hidden_states"].shape[1]
    rows = sum(e.shape[0] for e in embeds)
    allowed = isolation_mask(text, rows, inputs["hidden_states"].shape[1])
    oracle_inputs = with_concepts_appended(inputs, embeds)
    concept_ids = torch.zeros(inputs["hidden_states"].shape[0], rows, 4, dtype=inputs["txt_ids"].dtype)
    concept_ids[..., 3] = torch.as_tensor(positions, dtype=concept_ids.dtype)
    oracle_inputs["txt_ids"] = torch.cat([inputs["txt_ids"], concept_ids], dim=1)
    with captured_streams(transformer, text, image_tokens=num_map_tokens) as captured, torch.no_grad():
        transformer(**oracle_inputs, joint_attention_kwargs={"attention_mask": allowed})
    return oracle_from_captured(captured, embeds, layers, softmax=softmax, space=space)


# ---------------------------------------------------------------- 1. conformance suite
def own_positions(embeds):
    """The "own" policy's positions for user-given embeddings: 0..n-1 within each concept."""
    return [position for embed in embeds for position in range(embed.shape[0])]


class Flux2Case:
    """Tiny FLUX.2 models: 4-axis RoPE in the bare inputs; a non-distilled Klein pipeline with CFG."""

    oracle_spaces = ("output", "value")
    pipeline_grid = (8, 12)

    def make_transformer(self, seed):
        return tv.flux2_transformer(seed=seed, guidance=True)

    def make_inputs(self, transformer, seed):
        return transformer_inputs(transformer, seed=seed)

    def expected_grid(self, inputs):
        return (4, 6)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, own_positions(embeds), 24, softmax=softmax,
                           space=space)

    def make_pipeline(self):
        return tv.flux2_klein_pipeline(is_distilled=False)

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2):
        """(Klein's negative prompt is always the empty one: ``negative`` is not used.)"""
        return tv.flux2_generate(pipe, prompt, guidance_scale=4.0 if guidance else 1.0, height=32, width=48,
                                 num_inference_steps=steps)


class TestFlux2(Flux2Case, AdapterContract):
    pass


def test_distilled_klein_pipeline_output_is_bit_identical(klein):
    plain = tv.flux2_generate(klein, height=32, width=48)
    with ConceptAttention(klein, CONCEPTS) as ca:
        watched = tv.flux2_generate(klein, height=32, width=48)
    assert torch.equal(plain, watched)
    maps = ca.maps
    assert maps.tensor.shape == (1, 3, 8, 12)
    assert maps.layers == [2, 3] and maps.steps == [0, 1]
    assert torch.allclose(maps.tensor.sum(1), torch.ones(1, 8, 12), atol=1e-5)
    assert maps.meta["family"] == "flux2"


@pytest.mark.parametrize("guidance", [False, True])
def test_bare_transformer_with_4_axis_rope_is_bit_identical(guidance):
    transformer = tv.flux2_transformer(seed=2, guidance=guidance)
    inputs = transformer_inputs(transformer)
    ca = assert_output_unchanged(transformer, inputs)
    assert ca.maps.tensor.shape == (2, 3, 4, 6)


# ---------------------------------------------------------------- 2. oracle and RoPE policy
@pytest.mark.parametrize("policy", ["own", "zero", 7])
@pytest.mark.parametrize("softmax", [True, False])
def test_maps_match_mask_oracle_for_each_position_policy(policy, softmax):
    transformer = tv.flux2_transformer(seed=3)
    inputs = transformer_inputs(transformer, seed=4)
    embeds = concept_embeds(transformer, sizes=(1, 3, 2))
    layers = [1, 3]
    ca = ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=embeds, layers=layers, softmax=softmax,
                          space=["output", "value"])
    ca.adapter.concept_positions = policy
    with torch.no_grad(), ca:
        transformer(**inputs)
    positions = {"own": [0, 0, 1, 2, 0, 1], "zero": [0] * 6, 7: [7] * 6}[policy]
    assert_matches_oracle(ca, lambda space: oracle_maps(transformer, inputs, embeds, layers, positions, 24,
                                                        softmax=softmax, space=space))


def test_position_policy_changes_maps_and_bad_policy_is_refused():
    transformer = tv.flux2_transformer(seed=5)
    inputs = transformer_inputs(transformer)
    embeds = concept_embeds(transformer)
    results = {}
    for policy in ("zero", 40):
        ca = ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=embeds)
        ca.adapter.concept_positions = policy
        with torch.no_grad(), ca:
            transformer(**inputs)
        results[policy] = ca.maps.tensor
    assert not torch.allclose(results["zero"], results[40], atol=1e-4)
    ca = ConceptAttention(transformer, ["a"], concept_embeds=[torch.zeros(1, 48)])
    ca.adapter.concept_positions = "middle"
    with pytest.raises(ValueError, match="concept_positions"):
        with ca:
            pass
    assert Flux2Adapter(transformer, concept_positions="zero").concept_positions == "zero"


def test_reference_image_tokens_are_attended_but_not_mapped():
    transformer = tv.flux2_transformer(seed=6)
    inputs = transformer_inputs(transformer, references=8)
    embeds = concept_embeds(transformer)
    ca = assert_output_unchanged(transformer, inputs, embeds, concept_modulation="prompt")
    assert ca.maps.tensor.shape == (2, 3, 4, 6)
    expected = oracle_maps(transformer, inputs, embeds, [2, 3], [0, 0, 1, 0], 24)
    assert torch.allclose(as_tokens(ca.maps).double(), expected, atol=1e-5)


# ---------------------------------------------------------------- 3. concepts through the chat template
def test_concepts_use_the_template_path_and_their_own_span(klein):
    ca = ConceptAttention(klein, ["dog", "traffic light", "sky"], max_sequence_length=32)
    template_ids = klein.tokenizer(
        klein.tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                            add_generation_prompt=True)
    ).input_ids
    prefix = template_ids.index(klein.tokenizer.convert_tokens_to_ids("<|im_end|>"))  # "<|im_start|>user\n"
    positions = ca.adapter._encoded_positions
    assert [p.tolist() for p in positions] == [[prefix], [prefix, prefix + 1], [prefix]]
    assert ca.groups.sizes == (1, 2, 1)
    full, _ = klein.encode_prompt(prompt="traffic light", device="cpu", max_sequence_length=32)
    assert torch.allclose(ca.concept_embeds[1], full[0, prefix:prefix + 2].float())
    assert ca.concept_embeds[0].shape == (1, klein.transformer.config.joint_attention_dim)


def test_dev_pipeline_system_message_template_and_bit_identity():
    pipe = tv.flux2_dev_pipeline()
    pipe.set_progress_bar_config(disable=True)
    options = {"max_sequence_length": 320, "guidance_scale": 4.0}
    plain = tv.flux2_generate(pipe, **options)
    ca = ConceptAttention(pipe, ["dog", "traffic light"], max_sequence_length=320)
    with ca:
        watched = tv.flux2_generate(pipe, **options)
    assert torch.equal(plain, watched)
    assert ca.maps.tensor.shape == (1, 2, 8, 8)
    empty = pipe.tokenizer.apply_chat_template(
        [[{"role": "system", "content": [{"type": "text", "text": pipe.system_message}]},
          {"role": "user", "content": [{"type": "text", "text": ""}]}]], tokenize=True, return_dict=True,
    )["input_ids"][0]
    end = len(empty) - 1 - empty[::-1].index(pipe.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert [p.tolist() for p in ca.adapter._encoded_positions] == [[end], [end, end + 1]]


def test_span_helper_handles_left_padding():
    template = [5, 6, 9]
    ids = torch.tensor([0, 0, 5, 6, 7, 8, 9])
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 1])
    assert concept_token_span(ids, mask, template).tolist() == [4, 5]


# ---------------------------------------------------------------- 4. refusals and restore
def kv_inputs(transformer, references=8, seed=0):
    """Klein KV layout: [reference tokens, generated tokens] for the extract step, generated only after."""
    inputs = transformer_inputs(transformer, batch=1, references=references, seed=seed)
    generated = 24
    order = list(range(generated, generated + references)) + list(range(generated))
    extract = dict(inputs, hidden_states=inputs["hidden_states"][:, order], img_ids=inputs["img_ids"][:, order],
                   kv_cache_mode="extract", num_ref_tokens=references, return_dict=False)
    cached = dict(inputs, hidden_states=inputs["hidden_states"][:, :generated],
                  img_ids=inputs["img_ids"][:, :generated], kv_cache_mode="cached", return_dict=False)
    return extract, cached


def test_kv_cache_modes_map_the_generated_tokens_and_attend_to_references():
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

    transformer = tv.flux2_transformer(seed=8)
    for block in transformer.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in transformer.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    before = {name: proc for name, proc in transformer.attn_processors.items()}
    extract, cached = kv_inputs(transformer)
    embeds = concept_embeds(transformer)
    with torch.no_grad():
        plain_out, cache = transformer(**extract)
        plain_cached = transformer(**cached, kv_cache=cache)[0]
        with ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=embeds) as first:
            out, cache = transformer(**extract)
        with ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=embeds) as later:
            out_cached = transformer(**cached, kv_cache=cache)[0]
        with ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=embeds) as no_reference:
            transformer(**{k: v for k, v in cached.items() if k != "kv_cache_mode"})
    assert torch.equal(out, plain_out) and torch.equal(out_cached, plain_cached)
    assert first.maps.tensor.shape == (1, 3, 4, 6) and later.maps.tensor.shape == (1, 3, 4, 6)
    # the same generated tokens see the same reference keys in both modes, so the maps agree ...
    assert torch.allclose(first.maps.tensor, later.maps.tensor, atol=1e-5)
    # ... and the reference tokens matter
    assert not torch.allclose(later.maps.tensor, no_reference.maps.tensor, atol=1e-4)
    after = transformer.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_klein_kv_pipeline_with_reference_image():
    from diffusers import Flux2KleinKVPipeline
    from PIL import Image

    base = tv.flux2_klein_pipeline()
    pipe = Flux2KleinKVPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                                tokenizer=base.tokenizer, transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (64, 64), (200, 30, 30))  # the pipeline needs >= 64 px; reference 16x16 tokens

    def run():
        return pipe(prompt="a dog by a tree", image=image, height=32, width=32, num_inference_steps=3,
                    max_sequence_length=32, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    plain = run()
    with ConceptAttention(pipe, CONCEPTS) as ca:
        watched = run()
    assert torch.equal(plain, watched)
    assert ca.maps.tensor.shape == (1, 3, 8, 8) and ca.maps.steps == [0, 1, 2]


def test_explain_real_image_matches_a_full_forward(klein):
    from PIL import Image

    from concept_attention.core.contract import ExplainRequest
    from concept_attention.explanation import explain

    picture = Image.new("RGB", (40, 24), (30, 140, 60))
    maps = explain(klein, picture, CONCEPTS, prompt="a dog", num_samples=2, max_sequence_length=32, size=(48, 32))
    assert maps.tensor.shape == (1, 3, 8, 12) and maps.image.size == (40, 24)
    pixels = klein.image_processor.preprocess(picture, height=32, width=48)
    generator = torch.Generator().manual_seed(0)
    session = ConceptAttention(klein, CONCEPTS, max_sequence_length=32)
    inputs = session.adapter.explain_inputs(ExplainRequest(klein, pixels, "a dog", 0.5, 2, generator, 32))
    with torch.no_grad(), session:
        klein.transformer(**inputs)  # all blocks, no early exit
    assert torch.allclose(maps.tensor, session.maps.tensor.mean(0, keepdim=True), atol=1e-6)


def test_generate_helper_runs_flux2_pipelines(klein):
    from concept_attention.generation import generate

    klein.concept_attention_defaults = {"max_sequence_length": 32}
    try:
        maps = generate(klein, "a dog by a tree", ["dog", "tree"], steps=2, size=(32, 32))
    finally:
        del klein.concept_attention_defaults
    assert maps.tensor.shape == (1, 2, 8, 8) and maps.image.size == (32, 32)
    assert "cross_attention" in maps.others
