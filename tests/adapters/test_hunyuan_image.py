"""HunyuanImage 2.1 adapter on tiny random-config models: the conformance suite, the float64 oracle of the
Hunyuan concept stream (shared with ``test_hunyuan_video``), distilled / MeanFlow and 5-D refiner inputs,
concept tokens inside the prompt template, real images (explain, CLI, web app).

The tiny pipeline is built here: a Qwen2.5-VL stand-in (text and a one-block vision tower) with a Qwen-style
chat tokenizer (``tiny_video_flux2``), ByT5, a 2× VAE and 2×2 patches (the shared explain/CLI check's grid).
"""

from __future__ import annotations

import pytest
import torch

import tiny_video_flux2 as tv
from concept_attention import ConceptAttention, explain
from contract import AdapterContract
from helpers import as_tokens, assert_output_unchanged, check_explain_and_cli, concept_embeds, record_maps
from helpers import one_thread  # noqa: F401  (autouse: one thread for tiny matmuls)
from test_hunyuan_video import FusingIsANoOp, oracle_maps

CONCEPTS = ["dog", "tree", "sky"]


# ---------------------------------------------------------------- tiny models
def image_transformer(seed=0, layers=4, guidance=False, meanflow=False, patch=(2, 2), rope=(8, 8)):
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(seed)
    return HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=layers,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=patch, guidance_embeds=guidance,
        text_embed_dim=16, text_embed_2_dim=8, rope_axes_dim=rope, use_meanflow=meanflow,
    ).eval()


def qwen_vl(tokenizer, seed=0):
    """A Qwen2.5-VL stand-in whose text model is 16 wide (3 layers) and whose vision tower has one block."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    extra = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": extra + 3, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 3,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "initializer_range": 0.5,
                     "bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vocab_size=extra + 3, hidden_size=16, vision_start_token_id=extra, vision_end_token_id=extra + 1,
        vision_token_id=extra + 2, image_token_id=extra + 2, video_token_id=extra + 2,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def image_pipeline(seed=0, guidance_scale=3.5):
    """A tiny ``HunyuanImagePipeline`` (APG/CFG guider, no OCR guider)."""
    from diffusers import (
        AdaptiveProjectedMixGuidance, AutoencoderKLHunyuanImage, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline,
    )
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = tv.qwen_tokenizer()
    encoder = qwen_vl(tokenizer, seed)
    byt5 = T5EncoderModel(T5Config(vocab_size=384, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                                    layers_per_block=1, spatial_compression_ratio=2, sample_size=64,
                                    scaling_factor=0.75).eval()
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=encoder, tokenizer=tokenizer,
        text_encoder_2=byt5, tokenizer_2=ByT5Tokenizer(), transformer=image_transformer(seed),
        guider=AdaptiveProjectedMixGuidance(guidance_scale=guidance_scale, adaptive_projected_guidance_start_step=1),
    )
    pipe.prompt_template_encode_start_idx = template_prefix_length(pipe)
    return pipe


def template_prefix_length(pipe):
    """Tokens before the user's text in the prompt template (the real tokenizer's ``drop_idx`` 34)."""
    ids = [pipe.tokenizer(pipe.prompt_template_encode.format(word))["input_ids"] for word in ("dog", "cat")]
    return next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)


def image_generate(pipe, prompt="a dog by a tree", guidance=False, negative="a cat", steps=2, **kwargs):
    from diffusers import AdaptiveProjectedMixGuidance

    pipe.guider = AdaptiveProjectedMixGuidance(guidance_scale=3.5 if guidance else 1.0,
                                               adaptive_projected_guidance_start_step=1)
    return pipe(prompt, negative_prompt=negative, height=32, width=48, num_inference_steps=steps,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images


def image_inputs(transformer, seed=0, batch=2, height=8, width=12, text=7, glyphs=5, frames=None):
    """Bare keyword arguments: latents on a (4, 6) patch grid, a padded prompt, glyph rows in the first prompt."""
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[-1, -3:] = 0
    glyph_mask = torch.zeros(batch, glyphs, dtype=torch.long)
    glyph_mask[0, :2] = 1
    shape = (batch, config.in_channels, *((frames,) if frames else ()), height, width)
    inputs = {
        "hidden_states": torch.randn(shape, generator=g),
        "timestep": torch.tensor([700.0, 350.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, text, config.text_embed_dim, generator=g),
        "encoder_attention_mask": mask,
        "encoder_hidden_states_2": torch.randn(batch, glyphs, config.text_embed_2_dim, generator=g),
        "encoder_attention_mask_2": glyph_mask,
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3250.0)
    if config.use_meanflow:
        inputs["timestep_r"] = torch.tensor([500.0, 100.0][:batch])
    return inputs


# ---------------------------------------------------------------- 1. conformance suite
class HunyuanImageCase(FusingIsANoOp):
    """Tiny HunyuanImage 2.1 (4 dual + 1 single block); the pipeline's APG/CFG guider names its calls."""

    oracle_spaces = ("output", "value")
    pipeline_grid = (8, 12)

    def make_transformer(self, seed):
        return image_transformer(seed)

    def make_inputs(self, transformer, seed):
        return image_inputs(transformer, seed)

    def expected_grid(self, inputs):
        return (4, 6)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, softmax, space)

    def make_pipeline(self):
        return image_pipeline()

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2):
        return image_generate(pipe, prompt, guidance, negative, steps)


class TestHunyuanImage(HunyuanImageCase, AdapterContract):
    pass


# ---------------------------------------------------------------- 2. variants and concept tokens
@pytest.fixture(scope="module")
def pipe():
    built = image_pipeline(seed=1)
    built.set_progress_bar_config(disable=True)
    return built


def test_distilled_meanflow_transformer_matches_the_oracle():
    """Guidance and MeanFlow ``timestep_r`` embeddings enter the blocks' ``temb`` (no text): both modulations agree."""
    transformer = image_transformer(seed=3, guidance=True, meanflow=True)
    inputs = image_inputs(transformer, seed=5)
    embeds = concept_embeds(transformer, sizes=(2, 1, 1))
    assert_output_unchanged(transformer, inputs, embeds)
    zero = record_maps(transformer, inputs, embeds, layers=[1, 3], concept_modulation="zero", space=["output", "value"])
    prompt = record_maps(transformer, inputs, embeds, layers=[1, 3], concept_modulation="prompt")
    assert torch.equal(zero.maps.tensor, prompt.maps.tensor)
    for space in ("output", "value"):
        expected = oracle_maps(transformer, inputs, embeds, [1, 3], space=space)
        assert torch.allclose(as_tokens(zero.maps_for(space)).double(), expected, atol=1e-5)


def test_refiner_pipeline_latents_of_one_frame_map_on_the_image_grid():
    transformer = image_transformer(seed=4, patch=(1, 2, 2), rope=(4, 6, 6))
    inputs = image_inputs(transformer, seed=1, frames=1)
    ca = assert_output_unchanged(transformer, inputs)
    assert ca.maps.tensor.shape == (2, 3, 4, 6)
    expected = oracle_maps(transformer, inputs, concept_embeds(transformer), ca.layers)
    assert torch.allclose(as_tokens(ca.maps).double(), expected, atol=1e-5)


def test_concept_rows_are_the_concepts_own_tokens_inside_the_prompt_template(pipe):
    tokenizer = pipe.tokenizer
    with torch.no_grad():
        ca = ConceptAttention(pipe, ["dog", "traffic light"])
        assert [e.shape[0] for e in ca.concept_embeds] == [1, 2]
        ids = tokenizer(pipe.prompt_template_encode.format("traffic light"))["input_ids"]
        own = tokenizer("traffic light", add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(ids)) if ids[i:i + len(own)] == own) - pipe.prompt_template_encode_start_idx
        embeds = pipe.encode_prompt("traffic light", device="cpu")[0][0]
    assert torch.allclose(ca.concept_embeds[1], embeds[start:start + 2], atol=1e-5)


def test_quoted_glyph_text_joins_the_prompt_stream_only(pipe):
    """ByT5 glyph rows of a quoted prompt text are prompt rows; outputs stay bit-identical, concepts unchanged."""
    plain = image_generate(pipe, 'a sign that says "dog"', guidance=True)
    with ConceptAttention(pipe, CONCEPTS) as ca:
        watched = image_generate(pipe, 'a sign that says "dog"', guidance=True)
    assert torch.equal(plain, watched) and ca.maps.tensor.shape == (1, 3, 8, 12)
    assert [e.shape[0] for e in ca.concept_embeds] == [1, 1, 1]


# ---------------------------------------------------------------- 3. real images, command line, web app
def test_explain_equals_an_independent_session_and_exits_early(pipe):
    import numpy as np
    from PIL import Image

    picture = Image.fromarray((np.random.default_rng(2).random((32, 48, 3)) * 255).astype("uint8"))
    transformer = pipe.transformer
    pixels = pipe.image_processor.preprocess(picture, height=32, width=48)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
        noise = torch.randn((2, *latents.shape[1:]), generator=torch.Generator().manual_seed(3))
        embeds, mask, glyphs, glyphs_mask = pipe.encode_prompt("a dog", device="cpu", num_images_per_prompt=2)
    inputs = {"hidden_states": 0.4 * latents + 0.6 * noise, "timestep": torch.full((2,), 600.0),
              "encoder_hidden_states": embeds, "encoder_attention_mask": mask, "encoder_hidden_states_2": glyphs,
              "encoder_attention_mask_2": glyphs_mask}
    ran = []
    handles = [block.register_forward_pre_hook(lambda m, a, kw, i=i: ran.append(i), with_kwargs=True)
               for i, block in enumerate([*transformer.transformer_blocks, *transformer.single_transformer_blocks])]
    try:
        maps = explain(pipe, picture, CONCEPTS, prompt="a dog", timestep=0.6, num_samples=2, seed=3, size=(48, 32),
                       layers=[1, 2])
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [0, 1, 2] and maps.tensor.shape == (1, 3, 8, 12)
    embeds = ConceptAttention(pipe, CONCEPTS).concept_embeds
    expected = record_maps(transformer, inputs, embeds, concepts=CONCEPTS, layers=[1, 2]).maps.tensor
    assert torch.allclose(maps.tensor, expected.mean(0, keepdim=True), atol=1e-5)


def test_explain_and_cli(pipe, tmp_path):
    generated = check_explain_and_cli(pipe, tmp_path, {})
    assert generated.meta["family"] == "hunyuanimage"


def test_web_app_generates_and_explains(pipe, tmp_path):
    import numpy as np
    from PIL import Image

    from concept_attention.app import ConceptApp

    app = ConceptApp(pipe)
    assert not app.video and app.num_layers == 4
    generated = app.run_generate("a dog by a tree", "dog, tree", 0, 2, 48, 32)
    picture = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype("uint8")).save(picture)
    explained = app.run_explain(str(picture), "dog, sky", "", 0.5, 1, 2, 3)
    for views in (generated, explained):
        assert views[0] is not None and len(views) >= 2
