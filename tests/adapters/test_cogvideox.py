"""CogVideoX adapter on tiny random-config models: exactness (RoPE, CFG), mask oracle, video grid, memory."""

from __future__ import annotations

import gc

import pytest
import torch

import tiny_video_flux2 as tv
from concept_attention import ConceptAttention
from contract import AdapterContract
from helpers import (
    as_tokens, assert_matches_oracle, assert_output_unchanged, concept_embeds, isolation_mask, oracle_from_captured,
    record_maps, with_concepts_appended,
)

CONCEPTS = ["dog", "tree", "sky"]


@pytest.fixture(scope="module")
def cog():
    pipe = tv.cogvideox_pipeline(rope=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- helpers
def transformer_inputs(transformer, batch=2, frames=3, height=4, width=6, seed=0, rope=False):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    inputs = {
        "hidden_states": torch.randn(batch, frames, cfg.in_channels, height, width, generator=g),
        "encoder_hidden_states": torch.randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g),
        "timestep": torch.full((batch,), 700, dtype=torch.long),
    }
    if rope:
        inputs["image_rotary_emb"] = tv.cogvideox_rotary(transformer, frames, height, width)
    return inputs


def oracle_maps(transformer, inputs, embeds, layers, softmax=True, space="output", rows_used=None):
    """Concept rows appended to the text, isolated by an attention mask (text keeps its own modulation).

    For models with the joint sin-cos position table the table's text length is widened to match
    (its text rows are zeros, so the prompt and video are unaffected).
    """
    text = inputs["encoder_hidden_states"].shape[1]
    rows = sum(e.shape[0] for e in embeds)
    batch = inputs["hidden_states"].shape[0]
    video = inputs["hidden_states"][0].numel() // inputs["hidden_states"].shape[2]
    video //= transformer.config.patch_size ** 2
    allowed = isolation_mask(text, rows, video)
    oracle_inputs = with_concepts_appended(inputs, embeds)
    concept = slice(text, text + rows)
    captured, handles = {}, []
    for index, block in enumerate(transformer.transformer_blocks):
        attn = block.attn1
        handles.append(attn.to_out[0].register_forward_pre_hook(
            lambda m, a, i=index: captured.update({("x", i): a[0][:, text + rows:], ("c", i): a[0][:, concept]})))
        handles.append(attn.to_v.register_forward_hook(
            lambda m, a, o, i=index: captured.update({("vx", i): o[:, text + rows:], ("vc", i): o[:, concept]})))
    embed = transformer.patch_embed
    saved = embed.max_text_seq_length
    embed.max_text_seq_length = text + rows
    try:
        with torch.no_grad():
            transformer(**oracle_inputs, attention_kwargs={"attention_mask": allowed.expand(batch, -1, -1)})
    finally:
        embed.max_text_seq_length = saved
        for h in handles:
            h.remove()
    result = oracle_from_captured(captured, embeds, layers, softmax=softmax, space=space)
    return result if rows_used is None else result[rows_used]


# ---------------------------------------------------------------- 1. conformance suite
class CogVideoXCase:
    """Tiny CogVideoX models with RoPE: bare inputs of 3 latent frames on a 2 × 3 patch grid; batched CFG."""

    attention = "attn1"
    oracle_spaces = ("output", "value")
    pipeline_grid = (3, 2, 3)

    def make_transformer(self, seed):
        return tv.cogvideox_transformer(seed=seed, rope=True)

    def make_inputs(self, transformer, seed):
        return transformer_inputs(transformer, seed=seed, rope=True)

    def expected_grid(self, inputs):
        return (3, 2, 3)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, softmax, space)

    def make_pipeline(self):
        return tv.cogvideox_pipeline(rope=True)

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2):
        return tv.cogvideox_generate(pipe, prompt, guidance_scale=6.0 if guidance else 1.0, negative_prompt=negative,
                                     num_inference_steps=steps)


class TestCogVideoX(CogVideoXCase, AdapterContract):
    pass


@pytest.mark.parametrize("rope", [False, True])
def test_bare_transformer_is_bit_identical_with_and_without_rope(rope):
    transformer = tv.cogvideox_transformer(seed=1, rope=rope)
    inputs = transformer_inputs(transformer, rope=rope)
    ca = assert_output_unchanged(transformer, inputs)
    assert ca.maps.tensor.shape == (2, 3, 3, 2, 3)
    for block in transformer.transformer_blocks:  # restored on exit
        assert type(block.attn1.processor).__name__ == "CogVideoXAttnProcessor2_0"
        assert not block._forward_pre_hooks and not block.attn1.to_v._forward_hooks


def test_pipeline_maps_are_video_shaped(cog):
    plain = tv.cogvideox_generate(cog, guidance_scale=6.0)
    with ConceptAttention(cog, CONCEPTS) as ca:
        watched = tv.cogvideox_generate(cog, guidance_scale=6.0)
    assert torch.equal(plain, watched)
    maps = ca.maps
    # 9 frames -> 3 latent frames; 16x24 pixels -> 4x6 latents -> 2x3 patches (non-square)
    assert maps.tensor.shape == (1, 3, 3, 2, 3)
    assert maps.grid == (3, 2, 3)
    assert maps.steps == [0, 1] and maps.layers == [2, 3]
    assert torch.allclose(maps.tensor.sum(1), torch.ones(1, 3, 2, 3), atol=1e-5)
    assert maps.meta["family"] == "cogvideox"


def test_cogvideox_15_temporal_patching_grid():
    transformer = tv.cogvideox_transformer(seed=2, rope=True, patch_size_t=2)
    inputs = transformer_inputs(transformer, batch=1, frames=4, rope=True)
    ca = assert_output_unchanged(transformer, inputs)
    assert ca.maps.tensor.shape == (1, 3, 2, 2, 3)


# ---------------------------------------------------------------- 2. oracle
@pytest.mark.parametrize("rope,softmax", [(False, True), (True, False)])
def test_maps_match_mask_oracle(rope, softmax):
    transformer = tv.cogvideox_transformer(seed=3, rope=rope)
    inputs = transformer_inputs(transformer, seed=4, rope=rope)
    embeds = concept_embeds(transformer, sizes=(1, 3, 2))
    layers = [1, 3]
    ca = record_maps(transformer, inputs, embeds, layers=layers, softmax=softmax, space=["output", "value"])
    assert_matches_oracle(ca, lambda space: oracle_maps(transformer, inputs, embeds, layers, softmax, space))


def test_batched_cfg_maps_equal_the_conditional_rows_alone(cog):
    calls = []
    handle = cog.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append(dict(kw)) if not calls else None, with_kwargs=True)
    try:
        with ConceptAttention(cog, CONCEPTS, timesteps=[0]) as guided:
            tv.cogvideox_generate(cog, guidance_scale=6.0)
    finally:
        handle.remove()
    assert calls[0]["hidden_states"].shape[0] == 2 and guided.maps.tensor.shape[0] == 1
    cond = {k: (v[1:] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 2 else v)
            for k, v in calls[0].items()}
    with torch.no_grad(), ConceptAttention(cog.transformer, CONCEPTS, concept_embeds=guided.concept_embeds) as alone:
        cog.transformer(**cond)
    assert torch.allclose(guided.maps.tensor, alone.maps.tensor, atol=1e-6)
    # the oracle agrees on the conditional rows of a batched bare call (cfg="batched")
    transformer = cog.transformer
    inputs = transformer_inputs(transformer, rope=True, seed=9)
    with torch.no_grad(), ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=concept_embeds(transformer),
                                           cfg="batched") as ca:
        transformer(**inputs)
    expected = oracle_maps(transformer, inputs, concept_embeds(transformer), ca.layers, rows_used=slice(1, 2))
    assert torch.allclose(as_tokens(ca.maps).double(), expected, atol=1e-5)


def test_no_cfg_keeps_every_row(cog):
    with ConceptAttention(cog, CONCEPTS) as ca:
        tv.cogvideox_generate(cog, ["a dog", "a cat on grass"], guidance_scale=1.0)
    assert ca.maps.tensor.shape[0] == 2


# ---------------------------------------------------------------- 3. memory: running sums only
def peak_extra_bytes(pipe, steps, concepts, frames=9):
    def peak(with_maps):
        gc.collect()
        with tv.LiveTensorBytes() as meter:
            if with_maps:
                with ConceptAttention(pipe, concepts, concept_embeds=embeds) as ca:
                    tv.cogvideox_generate(pipe, num_inference_steps=steps, num_frames=frames)
                maps = ca.maps  # noqa: F841  (results kept, as a user would)
            else:
                tv.cogvideox_generate(pipe, num_inference_steps=steps, num_frames=frames)
        return meter.peak

    width = pipe.transformer.config.text_embed_dim
    embeds = [torch.randn(1, width) for _ in concepts]
    return peak(True) - peak(False)


def test_peak_extra_memory_does_not_grow_with_steps(cog):
    two = peak_extra_bytes(cog, 2, CONCEPTS)
    eight = peak_extra_bytes(cog, 8, CONCEPTS)
    assert two > 0
    assert abs(eight - two) <= 0.05 * two, (two, eight)
    # what keeping per-step video vectors would cost: (steps x layers x 2 x tokens x width) float32
    config = cog.transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    vectors = 8 * 2 * 2 * 18 * width * 4
    assert eight < vectors
    # more concepts and more video tokens do cost more
    assert peak_extra_bytes(cog, 2, CONCEPTS + ["grass", "car", "house"], frames=13) > two


def test_fusing_inside_a_session_is_refused_clearly():
    transformer = tv.cogvideox_transformer(seed=13, rope=True)
    inputs = transformer_inputs(transformer, rope=True)
    with torch.no_grad(), ConceptAttention(transformer, ["a", "b"], concept_embeds=concept_embeds(transformer)[:2]):
        transformer.fuse_qkv_projections()  # diffusers replaces every processor here
        with pytest.raises(RuntimeError, match="replaced while ConceptAttention was installed"):
            transformer(**inputs)


def test_image_to_video_pipeline():
    from PIL import Image

    pipe = tv.cogvideox_pipeline(rope=True, image_to_video=True)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (24, 16), (120, 60, 20))
    plain = tv.cogvideox_generate(pipe, image=image)
    with ConceptAttention(pipe, CONCEPTS) as ca:
        watched = tv.cogvideox_generate(pipe, image=image)
    assert torch.equal(plain, watched)
    assert ca.maps.tensor.shape == (1, 3, 3, 2, 3)  # conditional half of the batched CFG call
