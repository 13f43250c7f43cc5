"""Qwen-Image adapter on tiny random-config models: the conformance suite (``QwenImageCase``) with a text
padding mask, a float64 re-implementation oracle (also with reference tokens and ``zero_cond_t``), concept
rows read through the pipeline's chat template, explain / CLI / web app, refusals, fused QKV."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from concept_attention import ConceptAttention
from contract import AdapterContract
from helpers import (
    assert_matches_oracle_maps, assert_output_unchanged, attend, check_explain_and_cli, concept_embeds,
    oracle_block_scores, record_maps, word_tokenizer,
)
from helpers import one_thread  # noqa: F401  (autouse: tiny matmuls on two busy cores are ~100x faster single-threaded)

CONCEPTS = ["dog", "tree", "sky"]
SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of "
          "the objects and background:")
WORDS = ["a", "the", "dog", "cat", "tree", "sky", "grass", "by", "on", "in", "red", "car", "traffic", "light", "of",
         "and", "user", "assistant", "system", *SYSTEM.replace(",", " ").replace(":", " ").split()]


@pytest.fixture(scope="module")
def qwen_pipe():
    return qwen_pipeline(seed=1)


# ---------------------------------------------------------------- tiny models
def qwen_encoder(tokenizer, seed=0):
    """A tiny Qwen2.5-VL (2 text layers of width 16, a 1-block vision tower)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {"bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}, **ids)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                  fullatt_block_indexes=[0], patch_size=2, spatial_merge_size=1, temporal_patch_size=1, window_size=4)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)).eval()


def qwen_transformer(seed=0, layers=4, **config):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=layers,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(4, 6, 6), **config).eval()


def qwen_pipeline(seed=0):
    """A tiny ``QwenImagePipeline``: VAE scale 2 (so 4 px per packed token), 4 dual blocks."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    tokenizer = word_tokenizer(WORDS, ["<|im_start|>"], "<|endoftext|>", "<|im_end|>")
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 1.2]).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                             text_encoder=qwen_encoder(tokenizer, seed), tokenizer=tokenizer,
                             transformer=qwen_transformer(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a dog by a tree", **kwargs):
    options = {"height": 32, "width": 48, "num_inference_steps": 2, "max_sequence_length": 16,
               "output_type": "latent", **kwargs}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **options).images


def transformer_inputs(transformer, batch=2, height=4, width=6, text=5, seed=0, references=0, padded=True):
    """Bare-call inputs: ``height × width`` generated tokens (then ``references`` reference tokens on a
    2-row grid, as the edit pipelines append them) and a text padding mask on the first sample."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    shapes = [(1, height, width)] + ([(1, 2, references // 2)] if references else [])
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[0, text - 2:] = 0
    return {
        "hidden_states": torch.randn(batch, height * width + references, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim, generator=g),
        "encoder_hidden_states_mask": mask if padded else None,
        "timestep": torch.full((batch,), 0.6),
        "img_shapes": [shapes] * batch,
    }


# ---------------------------------------------------------------- the float64 oracle
def rotate(rows, freqs):
    """``rows`` (B, S, H, D) rotated by complex ``freqs`` (S, D/2): consecutive pairs are complex numbers."""
    pairs = torch.view_as_complex(rows.reshape(*rows.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * freqs.to(torch.complex128)[None, :, None, :]).flatten(-2)


def capture_block_inputs(transformer, inputs):
    """Each block's keyword inputs, its attention's inputs and its image attention output (a plain run)."""
    captured, handles = {}, []
    for i, block in enumerate(transformer.transformer_blocks):
        handles += [
            block.register_forward_pre_hook(lambda m, a, kw, i=i: captured.__setitem__(i, kw), with_kwargs=True),
            block.attn.register_forward_pre_hook(lambda m, a, kw, i=i: captured.__setitem__(("attn", i), kw),
                                                 with_kwargs=True),
            block.attn.to_out[0].register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(("o_x", i), a[0])),
        ]
    try:
        with torch.no_grad():
            transformer(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def oracle_maps(transformer, inputs, embeds, layers, softmax=True, space="output"):
    """Direct float64 re-implementation of the joint attention and the concept stream.

    Block inputs come from a plain run; the rest is recomputed from the weights: o_x from the joint
    ``[text, image]`` attention (checked against the model's), concept rows through ``txt_norm``/``txt_in``,
    the block's ``txt_mod`` modulation (first half of ``temb`` with ``zero_cond_t``), text q/k/v, RoPE at
    text positions ``max(h//2, w//2) + 0..n-1`` per concept, attention over ``[image keys; concept keys]``.
    """
    captured = capture_block_inputs(transformer, inputs)
    model = copy.deepcopy(transformer).double()
    batch, shapes = inputs["hidden_states"].shape[0], inputs["img_shapes"][0]
    tokens = math.prod(shapes[0])
    start = max(max(h // 2, w // 2) for _, h, w in shapes)
    positions = torch.tensor([p for e in embeds for p in range(e.shape[0])])
    concept_freqs = transformer.pos_embed.pos_freqs[start + positions]
    with torch.no_grad():
        concepts = model.txt_in(model.txt_norm(torch.cat(embeds).double())).expand(batch, -1, -1)
        per_layer = []
        for index in range(max(layers) + 1):
            block, kw = model.transformer_blocks[index], captured[("attn", index)]
            attn = block.attn

            def qkv(x, projections, norms, freqs):
                q, k, v = (proj(x).unflatten(-1, (attn.heads, -1)) for proj in projections)
                return rotate(norms[0](q), freqs), rotate(norms[1](k), freqs), v

            image_freqs, text_freqs = kw["image_rotary_emb"]
            x, text = kw["hidden_states"].double(), kw["encoder_hidden_states"].double()
            q_x, k_x, v_x = qkv(x, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k), image_freqs)
            text_qkv = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            text_norms = (attn.norm_added_q, attn.norm_added_k)
            q_t, k_t, v_t = qkv(text, text_qkv, text_norms, text_freqs)
            mask = kw.get("encoder_hidden_states_mask")
            image_keys = torch.ones(batch, x.shape[1], dtype=torch.bool)
            keep = None if mask is None else torch.cat([mask.bool(), image_keys], 1)
            o_x = attend(torch.cat([q_t, q_x], 1), torch.cat([k_t, k_x], 1), torch.cat([v_t, v_x], 1), keep)
            o_x = o_x[:, text.shape[1]:]
            assert torch.allclose(o_x.flatten(2), captured[("o_x", index)].double(), atol=1e-5), index

            temb = captured[index]["temb"].double()
            temb = temb[:batch] if block.zero_cond_t else temb
            halves = block.txt_mod(temb)[:, None].chunk(2, -1)
            (shift, scale, gate), (shift2, scale2, gate2) = (half.chunk(3, -1) for half in halves)
            q_c, k_c, v_c = qkv(block.txt_norm1(concepts) * (1 + scale) + shift, text_qkv, text_norms, concept_freqs)
            o_c = attend(q_c, torch.cat([k_x, k_c], 1), torch.cat([v_x, v_c], 1))
            if index in layers:
                per_layer.append(oracle_block_scores(space, tokens, (o_x, o_c), (v_x, v_c), k_x, q_c,
                                                             attn.heads, embeds, softmax))
            concepts = concepts + gate * attn.to_add_out(o_c.flatten(2))
            concepts = concepts + gate2 * block.txt_mlp(block.txt_norm2(concepts) * (1 + scale2) + shift2)
    return torch.stack(per_layer).mean(0)


def assert_oracle(transformer, inputs, embeds, layers, spaces=("output", "value", "cross_attention")):
    return assert_matches_oracle_maps(oracle_maps, transformer, inputs, embeds, layers, spaces)


# ---------------------------------------------------------------- 1. conformance suite
class QwenImageCase:
    """Tiny Qwen-Image models: bare inputs with a text padding mask; true CFG in the pipeline (cache contexts)."""

    oracle_spaces = ("output", "value", "cross_attention")
    pipeline_grid = (8, 12)

    def make_transformer(self, seed):
        return qwen_transformer(seed)

    def make_inputs(self, transformer, seed):
        return transformer_inputs(transformer, seed=seed)

    def expected_grid(self, inputs):
        return (4, 6)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, softmax=softmax, space=space)

    def make_pipeline(self):
        return qwen_pipeline()

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2):
        cfg = {"true_cfg_scale": 3.0, "negative_prompt": negative} if guidance else {"true_cfg_scale": 1.0}
        return generate(pipe, prompt, num_inference_steps=steps, **cfg)


class TestQwenImage(QwenImageCase, AdapterContract):
    def test_fused_qkv_gives_the_same_maps(self):
        """``fuse_qkv_projections()`` does nothing to Qwen-Image's legacy attention modules; fusing one by hand
        adds ``to_qkv``/``to_added_qkv`` that its processor never uses: outputs and maps stay the same."""
        transformer = self.make_transformer(13)
        inputs = self.make_inputs(transformer, 0)
        embeds = concept_embeds(transformer)
        reference = record_maps(transformer, inputs, embeds)
        transformer.fuse_qkv_projections()
        attn = transformer.transformer_blocks[2].attn
        assert not attn.fused_projections and type(attn.processor).__name__ == "QwenDoubleStreamAttnProcessor2_0"
        with torch.no_grad():
            plain = transformer(**inputs).sample
        for block in transformer.transformer_blocks:
            block.attn.fuse_projections()
        assert attn.fused_projections and hasattr(attn, "to_qkv")
        fused = assert_output_unchanged(transformer, inputs, embeds)
        with torch.no_grad():
            assert torch.equal(transformer(**inputs).sample, plain)
        assert torch.allclose(fused.maps.tensor, reference.maps.tensor, atol=1e-6)


# ---------------------------------------------------------------- 2. edit layouts: reference tokens, zero_cond_t
@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_reference_tokens_are_attended_but_not_mapped(zero_cond_t):
    transformer = qwen_transformer(seed=2, zero_cond_t=zero_cond_t)
    inputs = transformer_inputs(transformer, references=8)
    embeds = concept_embeds(transformer, sizes=(1, 3, 2))
    ca = assert_output_unchanged(transformer, inputs, embeds)
    assert ca.maps.tensor.shape == (2, 3, 4, 6)
    assert_oracle(transformer, inputs, embeds, [1, 3])
    without = record_maps(transformer, dict(inputs, hidden_states=inputs["hidden_states"][:, :24],
                                            img_shapes=[[(1, 4, 6)]] * 2), embeds)
    assert not torch.allclose(without.maps.tensor, ca.maps.tensor, atol=1e-4)  # the reference tokens matter


def test_pipeline_batch_of_prompts_with_padding(qwen_pipe):
    prompts = ["a dog", "a cat on the grass by a tree"]  # different lengths: the pipeline passes a padding mask
    plain = generate(qwen_pipe, prompts, num_images_per_prompt=2)
    with ConceptAttention(qwen_pipe, CONCEPTS) as ca:
        watched = generate(qwen_pipe, prompts, num_images_per_prompt=2)
    assert torch.equal(plain, watched)
    assert ca.maps.tensor.shape == (4, 3, 8, 12) and ca.maps.meta["family"] == "qwenimage"
    assert ca.layers == [2, 3] and not torch.allclose(ca.maps.tensor[0], ca.maps.tensor[-1])


# ---------------------------------------------------------------- 3. concepts through the template
def test_concept_rows_are_the_concepts_own_tokens(qwen_pipe):
    ca = ConceptAttention(qwen_pipe, ["dog", "traffic light", "sky"], max_sequence_length=32)
    assert ca.groups.sizes == (1, 2, 1)
    assert [p.tolist() for p in ca.adapter._encoded_positions] == [[0], [0, 1], [0]]  # the concept is the prompt
    full, _ = qwen_pipe.encode_prompt(prompt="traffic light", device="cpu", max_sequence_length=32)
    assert full.shape[1] == 2 + 5  # the concept, then "<|im_end|>\n<|im_start|>assistant\n"
    assert torch.equal(ca.concept_embeds[1], full[0, :2].float())
    # a pipeline that keeps part of its template still gives each concept its own rows (and their positions)
    qwen_pipe.prompt_template_encode_start_idx = 31
    try:
        shifted = ConceptAttention(qwen_pipe, ["dog", "traffic light", "sky"], max_sequence_length=32)
    finally:
        qwen_pipe.prompt_template_encode_start_idx = 34
    assert [p.tolist() for p in shifted.adapter._encoded_positions] == [[3], [3, 4], [3]]
    assert all(torch.equal(a, b) for a, b in zip(shifted.concept_embeds, ca.concept_embeds))
    with ConceptAttention(qwen_pipe, ["dog", "traffic light", "sky"], max_sequence_length=32) as session:
        generate(qwen_pipe, max_sequence_length=32)
    assert session.maps.tensor.shape == (1, 3, 8, 12)


def test_explain_cli_and_app(tmp_path, qwen_pipe):
    from concept_attention.app import ConceptApp
    from concept_attention.core.contract import ExplainRequest
    from concept_attention.explanation import explain
    from PIL import Image

    generated = check_explain_and_cli(qwen_pipeline(seed=4), tmp_path, {})
    assert generated.meta["family"] == "qwenimage"
    picture = Image.new("RGB", (40, 24), (30, 140, 60))
    maps = explain(qwen_pipe, picture, CONCEPTS, prompt="a dog", num_samples=2, size=(48, 32))
    session = ConceptAttention(qwen_pipe, CONCEPTS)
    pixels = qwen_pipe.image_processor.preprocess(picture, height=32, width=48)
    inputs = session.adapter.explain_inputs(ExplainRequest(qwen_pipe, pixels, "a dog", 0.5, 2, torch.Generator()
                                                           .manual_seed(0)))
    with torch.no_grad(), session:
        qwen_pipe.transformer(**inputs)  # every block: the early exit changes nothing
    assert maps.tensor.shape == (1, 3, 8, 12)
    assert torch.allclose(maps.tensor, session.maps.tensor.mean(0, keepdim=True), atol=1e-6)
    app = ConceptApp(qwen_pipe)
    image, overlays, segmentation, cross, archive = app.run_generate("a dog by a tree", ["dog", "tree"], 0, 2, 48, 32)
    assert len(overlays) == 2 and len(cross) == 2 and archive.endswith(".zip")
    picture.save(tmp_path / "up.png")
    image, overlays, *_ = app.run_explain(str(tmp_path / "up.png"), ["dog", "sky"], "", 0.5, 1, 2, 3)
    assert len(overlays) == 2


# ---------------------------------------------------------------- 4. refusals
def test_layered_and_qwen_image_21_models_are_refused():
    from diffusers import QwenImage21Transformer2DModel

    layered = qwen_transformer(seed=5, use_layer3d_rope=True, use_additional_t_cond=True)
    processors = [block.attn.processor for block in layered.transformer_blocks]
    with pytest.raises(TypeError, match="layered Qwen-Image"):
        with ConceptAttention(layered, ["a"], concept_embeds=[torch.zeros(1, 16)]):
            pass
    assert [block.attn.processor for block in layered.transformer_blocks] == processors
    single_stream = QwenImage21Transformer2DModel(in_channels=16, out_channels=16, num_layers=1, attention_head_dim=16,
                                                  num_attention_heads=2, context_in_dim=16, axes_dims_rope=(4, 6, 6))
    with pytest.raises(TypeError, match="does not support QwenImage21Transformer2DModel"):
        ConceptAttention(single_stream, ["a"], concept_embeds=[torch.zeros(1, 16)])
