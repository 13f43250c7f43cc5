"""CogView4 adapter on tiny random-config models: the conformance suite (``CogView4Case``) with a float64
re-implementation oracle, a text mask and the control layout, concepts encoded alone (GLM left padding),
explain / CLI / web app, fused QKV by hand (the model has no ``fuse_qkv_projections``)."""

from __future__ import annotations

import copy

import pytest
import torch

from concept_attention import ConceptAttention
from contract import AdapterContract
from helpers import (
    assert_output_unchanged, attend, check_explain_and_cli, concept_embeds, oracle_block_scores, record_maps,
    word_tokenizer,
)
from helpers import one_thread  # noqa: F401  (autouse: tiny matmuls on two busy cores are ~100x faster single-threaded)

CONCEPTS = ["dog", "tree", "sky"]
WORDS = ["a", "the", "dog", "cat", "tree", "sky", "grass", "by", "on", "in", "red", "car", "traffic", "light", "of",
         "and"]


@pytest.fixture(scope="module")
def cog_pipe():
    return cogview4_pipeline(seed=1)


# ---------------------------------------------------------------- tiny models
def glm_tokenizer():
    """A word tokenizer that starts every text with ``[gMASK]<sop>``, as CogView4's GLM-4 tokenizer does."""
    from tokenizers import processors

    tokenizer = word_tokenizer(WORDS, ["[gMASK]", "<sop>"], "<|endoftext|>", "<|endoftext|>", extra=("[gMASK]", "<sop>"))
    specials = [(name, tokenizer.convert_tokens_to_ids(name)) for name in ("[gMASK]", "<sop>")]
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="[gMASK] <sop> $A",
                                                                         special_tokens=specials)
    return tokenizer


def cogview4_transformer(seed=0, layers=4, in_channels=4):
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(seed)
    return CogView4Transformer2DModel(patch_size=2, in_channels=in_channels, out_channels=4, num_layers=layers,
                                      attention_head_dim=16, num_attention_heads=2, text_embed_dim=16,
                                      time_embed_dim=16, condition_dim=8, sample_size=16).eval()


def cogview4_pipeline(seed=0):
    """A tiny ``CogView4Pipeline``: a 2-layer GLM encoder, VAE scale 2 (4 px per token), 4 blocks, 32 px default."""
    from diffusers import AutoencoderKL, CogView4Pipeline, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    tokenizer = glm_tokenizer()
    torch.manual_seed(seed)
    encoder = GlmModel(GlmConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8, initializer_range=0.5,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.pad_token_id)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, scaling_factor=1.5).eval()
    pipe = CogView4Pipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae,
                            transformer=cogview4_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a dog by a tree", **kwargs):
    options = {"height": 32, "width": 48, "num_inference_steps": 2, "max_sequence_length": 16,
               "output_type": "latent", **kwargs}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **options).images


def transformer_inputs(transformer, batch=2, height=8, width=12, text=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    size = torch.tensor([[height * 8.0, width * 8.0]]).repeat(batch, 1)
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, height, width, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, cfg.text_embed_dim, generator=g),
        "timestep": torch.tensor([600.0, 350.0])[:batch],
        "original_size": size, "target_size": size, "crop_coords": torch.zeros(batch, 2),
    }


# ---------------------------------------------------------------- the float64 oracle
def rotate_halves(rows, cos, sin):
    """RoPE in the halves convention (``use_real_unbind_dim=-2``) on (B, S, H, D) rows; cos/sin (S, D)."""
    first, second = rows.chunk(2, dim=-1)
    turned = torch.cat([-second, first], dim=-1)
    return rows * cos.double()[None, :, None] + turned * sin.double()[None, :, None]


def oracle_maps(transformer, inputs, embeds, layers, softmax=True, space="output"):
    """Direct float64 re-implementation: the joint ``[text, image]`` attention with the shared weights (o_x
    checked against the model's) and the concept stream with the *text* modulation, read from ``norm1.linear``
    in diffusers' chunk order (``c_shift_msa`` = 1, ``c_scale_msa`` = 3, ``c_gate_msa`` = 5, ``c_shift_mlp`` = 7,
    ``c_scale_mlp`` = 9, ``c_gate_mlp`` = 11), concept keys without RoPE."""
    captured, handles = {}, []
    for i, block in enumerate(transformer.transformer_blocks):
        handles += [
            block.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a)),
            block.attn1.register_forward_pre_hook(lambda m, a, kw, i=i: captured.__setitem__(("attn", i), kw),
                                                  with_kwargs=True),
            block.attn1.to_out[0].register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(("o", i), a[0])),
        ]
    try:
        with torch.no_grad():
            transformer(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    model = copy.deepcopy(transformer).double()
    batch, text = inputs["hidden_states"].shape[0], inputs["encoder_hidden_states"].shape[1]
    with torch.no_grad():
        concepts = model.patch_embed.text_proj(torch.cat(embeds).double()).expand(batch, -1, -1)
        per_layer = []
        for index in range(max(layers) + 1):
            block, kw = model.transformer_blocks[index], captured[("attn", index)]
            attn = block.attn1

            def qkv(rows):
                q, k, v = (proj(rows).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
                return attn.norm_q(q), attn.norm_k(k), v

            q, k, v = qkv(torch.cat([kw["encoder_hidden_states"], kw["hidden_states"]], 1).double())
            cos, sin = kw["image_rotary_emb"]
            q_x, k_x, v_x = rotate_halves(q[:, text:], cos, sin), rotate_halves(k[:, text:], cos, sin), v[:, text:]
            o_x = attend(torch.cat([q[:, :text], q_x], 1), torch.cat([k[:, :text], k_x], 1), v)[:, text:]
            assert torch.allclose(o_x.flatten(2), captured[("o", index)][:, text:].double(), atol=1e-5), index

            mod = [m[:, None] for m in block.norm1.linear(captured[index][2].double()).chunk(12, dim=1)]
            q_c, k_c, v_c = qkv(block.norm1.norm_context(concepts) * (1 + mod[3]) + mod[1])
            o_c = attend(q_c, torch.cat([k_x, k_c], 1), torch.cat([v_x, v_c], 1))
            if index in layers:
                per_layer.append(oracle_block_scores(space, None, (o_x, o_c), (v_x, v_c), k_x, q_c,
                                                             attn.heads, embeds, softmax))
            concepts = concepts + mod[5] * attn.to_out[0](o_c.flatten(2))
            normed = block.norm2_context(concepts) * (1 + mod[9]) + mod[7]
            concepts = concepts + mod[11] * block.ff(normed)
    return torch.stack(per_layer).mean(0)


# ---------------------------------------------------------------- 1. conformance suite
class CogView4Case:
    """Tiny CogView4 models: bare inputs on a 4 × 6 token grid; sequential CFG in the pipeline (cache contexts)."""

    attention = "attn1"
    oracle_spaces = ("output", "value", "cross_attention")
    pipeline_grid = (8, 12)

    def make_transformer(self, seed):
        return cogview4_transformer(seed)

    def make_inputs(self, transformer, seed):
        return transformer_inputs(transformer, seed=seed)

    def expected_grid(self, inputs):
        return (4, 6)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, softmax=softmax, space=space)

    def make_pipeline(self):
        return cogview4_pipeline()

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2):
        return generate(pipe, prompt, guidance_scale=4.0 if guidance else 1.0, negative_prompt=negative,
                        num_inference_steps=steps)


class TestCogView4(CogView4Case, AdapterContract):
    def test_fused_qkv_gives_the_same_maps(self):
        """No ``fuse_qkv_projections()`` here; fusing each ``attn1`` by hand adds a ``to_qkv`` that
        ``CogView4AttnProcessor`` never uses: outputs and maps stay the same."""
        transformer = self.make_transformer(13)
        assert not hasattr(transformer, "fuse_qkv_projections")
        inputs = self.make_inputs(transformer, 0)
        embeds = concept_embeds(transformer)
        reference = record_maps(transformer, inputs, embeds)
        with torch.no_grad():
            plain = transformer(**inputs).sample
        for block in transformer.transformer_blocks:
            block.attn1.fuse_projections()
        assert transformer.transformer_blocks[0].attn1.fused_projections
        fused = assert_output_unchanged(transformer, inputs, embeds)
        with torch.no_grad():
            assert torch.equal(transformer(**inputs).sample, plain)
        assert torch.allclose(fused.maps.tensor, reference.maps.tensor, atol=1e-6)


# ---------------------------------------------------------------- 2. text mask, control layout
def test_text_mask_and_control_channels_pass_through():
    transformer = cogview4_transformer(seed=2)
    inputs = transformer_inputs(transformer)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0  # left padding, as the pipeline pads
    ca = assert_output_unchanged(transformer, dict(inputs, attention_mask=mask))
    assert ca.maps.tensor.shape == (2, 3, 4, 6)
    control = cogview4_transformer(seed=3, in_channels=8)  # CogView4ControlPipeline: latents ‖ control latents
    ca = assert_output_unchanged(control, transformer_inputs(control, height=6, width=4))
    assert ca.maps.tensor.shape == (2, 3, 3, 2)


def test_image_keys_are_rotated_once():
    """CogView4 rotates image keys in place (halves convention); the adapter rotates only keys it sees unrotated."""
    from diffusers.models.embeddings import apply_rotary_emb

    from concept_attention.adapters.cogview4 import CogView4ConceptProcessor

    transformer = cogview4_transformer()
    processor = CogView4ConceptProcessor(None, transformer.transformer_blocks[0], 0, None)
    key, rotary = torch.randn(2, 2, 5 + 24, 16), transformer.rope(torch.zeros(1, 4, 8, 12))
    rotated = apply_rotary_emb(key[:, :, 5:], rotary, use_real_unbind_dim=-2)
    processor.capture.key_last = key[:, :, -1:].clone()
    assert torch.equal(processor._video_keys(key, 5, rotary), rotated.transpose(1, 2))
    key[:, :, 5:] = rotated  # what the original processor does to the captured keys
    assert torch.equal(processor._video_keys(key, 5, rotary), rotated.transpose(1, 2))


def test_pipeline_batch_of_prompts(cog_pipe):
    prompts = ["a dog", "a cat on the grass by a tree"]
    plain = generate(cog_pipe, prompts, num_images_per_prompt=2)
    with ConceptAttention(cog_pipe, CONCEPTS) as ca:
        watched = generate(cog_pipe, prompts, num_images_per_prompt=2)
    assert torch.equal(plain, watched)
    assert ca.maps.tensor.shape == (4, 3, 8, 12) and ca.maps.meta["family"] == "cogview4"
    assert ca.layers == [2, 3] and not torch.allclose(ca.maps.tensor[0], ca.maps.tensor[-1])


# ---------------------------------------------------------------- 3. concepts
def test_concepts_are_encoded_alone_with_their_own_padding(cog_pipe):
    ca = ConceptAttention(cog_pipe, ["dog", "traffic light", "sky"], max_sequence_length=32)
    assert ca.groups.sizes == (1, 2, 1)
    alone, _ = cog_pipe.encode_prompt("traffic light", do_classifier_free_guidance=False, device="cpu")
    assert alone.shape[1] == 16  # "[gMASK]<sop> traffic light" left-padded to 16 tokens
    assert torch.equal(ca.concept_embeds[1], alone[0, -2:].float())
    together, _ = cog_pipe.encode_prompt(["traffic light", "a cat on the grass by a tree"],
                                         do_classifier_free_guidance=False, device="cpu")
    assert not torch.allclose(together[0, -2:], alone[0, -2:], atol=1e-4)  # padding changes the vectors


def test_explain_cli_and_app(tmp_path, cog_pipe):
    from concept_attention.app import ConceptApp
    from concept_attention.core.contract import ExplainRequest
    from concept_attention.explanation import explain
    from PIL import Image

    generated = check_explain_and_cli(cogview4_pipeline(seed=4), tmp_path, {})
    assert generated.meta["family"] == "cogview4"
    picture = Image.new("RGB", (40, 24), (30, 140, 60))
    maps = explain(cog_pipe, picture, CONCEPTS, prompt="a dog", num_samples=2, size=(48, 32))
    session = ConceptAttention(cog_pipe, CONCEPTS)
    pixels = cog_pipe.image_processor.preprocess(picture, height=32, width=48)
    generator = torch.Generator().manual_seed(0)
    inputs = session.adapter.explain_inputs(ExplainRequest(cog_pipe, pixels, "a dog", 0.5, 2, generator))
    assert inputs["timestep"].tolist() == [500.0, 500.0] and inputs["target_size"].tolist() == [[32, 48]] * 2
    with torch.no_grad(), session:
        cog_pipe.transformer(**inputs)  # every block: the early exit changes nothing
    assert maps.tensor.shape == (1, 3, 8, 12)
    assert torch.allclose(maps.tensor, session.maps.tensor.mean(0, keepdim=True), atol=1e-6)
    app = ConceptApp(cog_pipe)
    image, overlays, segmentation, cross, archive = app.run_generate("a dog by a tree", ["dog", "tree"], 0, 2, 48, 32)
    assert len(overlays) == 2 and len(cross) == 2 and archive.endswith(".zip")
    picture.save(tmp_path / "up.png")
    image, overlays, *_ = app.run_explain(str(tmp_path / "up.png"), ["dog", "sky"], "", 0.5, 1, 2, 3)
    assert len(overlays) == 2
