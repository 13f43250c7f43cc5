"""HunyuanVideo 1.0 and 1.5 adapters on tiny random-config models: the conformance suite for both, a float64
oracle of the concept stream (token refiner alone, text weights, RoPE on video keys only), modulation, concept
tokens inside the prompt templates, token-replace image-to-video, real videos (explain_video, CLI, web app).

The tiny models are built here: a word-level Llama-style tokenizer covering HunyuanVideo 1.0's default
prompt template (its 95-token crop keeps the prompt), a Qwen-style chat tokenizer (``tiny_video_flux2``)
for HunyuanVideo 1.5's chat template with its system message, ByT5 and CLIP stand-ins.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny
import tiny_video_flux2 as tv
from concept_attention import ConceptAttention, ConceptMaps, explain_video, video
from contract import AdapterContract
from helpers import as_tokens, assert_output_unchanged, concept_embeds, grouped_scores, record_maps
from helpers import one_thread  # noqa: F401  (autouse: one thread for tiny matmuls)

CONCEPTS = ["dog", "tree", "sky"]


# ---------------------------------------------------------------- tiny HunyuanVideo 1.0
def llama_tokenizer():
    """A word-level tokenizer (BOS added) knowing every word of HunyuanVideo's default prompt template."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<pad>", "<unk>"]
    words = re.findall(r"\w+|[^\w\s]", re.sub("|".join(map(re.escape, specials)), " ",
                                               DEFAULT_PROMPT_TEMPLATE["template"]))
    vocab = {word: i for i, word in enumerate(dict.fromkeys(specials + ["\n"] + words + tiny.WORDS))}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), "isolated")])
    model.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                         special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])


def hv_transformer(seed=0, layers=4, single=1, condition=None):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=layers,
        num_single_layers=single, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
        image_condition_type=condition,
    ).eval()


def hv_pipeline(seed=0):
    """A tiny ``HunyuanVideoPipeline``: Llama stand-in (default template), CLIP pooled vector, 8× / 4× VAE."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer, clip_tokenizer = llama_tokenizer(), tiny.clip_tokenizer()
    torch.manual_seed(seed)
    llama = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)).eval()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=8, intermediate_size=16, num_attention_heads=2,
        num_hidden_layers=1, max_position_embeddings=77, eos_token_id=clip_tokenizer.eos_token_id,
        bos_token_id=clip_tokenizer.bos_token_id, pad_token_id=clip_tokenizer.eos_token_id)).eval()
    block = ("HunyuanVideoDownBlock3D",) * 4
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=block,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=False).eval()
    return HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=hv_transformer(seed), vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip,
                                tokenizer_2=clip_tokenizer)


def hv_generate(pipe, prompt="a dog by a tree", guidance=False, negative="a cat", steps=2, **kwargs):
    cfg = {"true_cfg_scale": 3.0, "negative_prompt": negative} if guidance else {}
    return pipe(prompt, height=32, width=48, num_frames=9, num_inference_steps=steps, max_sequence_length=16,
                output_type="latent", generator=torch.Generator().manual_seed(0), **cfg, **kwargs).frames


def hv_inputs(transformer, seed=0, batch=2, frames=3, height=4, width=6, text=7, pooled_zero=False):
    """Bare keyword arguments: latents on a (3, 2, 3) patch grid, a padded prompt, pooled CLIP, guidance."""
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    mask = torch.ones(batch, text)
    mask[-1, -3:] = 0  # padding in the last prompt
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=g)
    return {
        "hidden_states": torch.randn(batch, config.in_channels, frames, height, width, generator=g),
        "timestep": torch.tensor([700.0, 350.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, text, config.text_embed_dim, generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.zeros_like(pooled) if pooled_zero else pooled,
        "guidance": torch.full((batch,), 6000.0),
    }


# ---------------------------------------------------------------- tiny HunyuanVideo 1.5
def hv15_transformer(seed=0, layers=4):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=layers,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(4, 6, 6), target_size=32, task_type="t2v",
    ).eval()


def hv15_pipeline(seed=0, guidance_scale=6.0):
    """A tiny ``HunyuanVideo15Pipeline``: Qwen2.5-VL text stand-in (chat template), ByT5, 8× / 4× VAE, CFG guider."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tokenizer = tv.qwen_tokenizer()
    torch.manual_seed(seed)
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.5,  # text that matters to a tiny model
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})).eval()
    byt5 = T5EncoderModel(T5Config(vocab_size=384, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        spatial_compression_ratio=8, temporal_compression_ratio=4, downsample_match_channel=False,
        upsample_match_channel=False).eval()

    pipe = HunyuanVideo15Pipeline(
        text_encoder=qwen, tokenizer=tokenizer, transformer=hv15_transformer(seed), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=byt5, tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale))
    pipe.prompt_template_encode_start_idx = system_prefix_length(pipe)
    return pipe


def system_prefix_length(pipe):
    """Tokens before the user's text in the 1.5 chat template (the real tokenizer's 108; a saved and reloaded
    tiny pipeline keeps 108, i.e. some system-message tokens)."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    ids = [pipe.tokenizer.apply_chat_template(format_text_input([word], pipe.system_message), tokenize=True,
                                              add_generation_prompt=True, return_dict=True)["input_ids"][0]
           for word in ("dog", "cat")]
    return next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)


def hv15_generate(pipe, prompt="a dog by a tree", guidance=False, negative="a cat", steps=2, **kwargs):
    from diffusers.guiders import ClassifierFreeGuidance

    pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0 if guidance else 1.0)
    return pipe(prompt, negative_prompt=negative, height=32, width=48, num_frames=9, num_inference_steps=steps,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).frames


def hv15_inputs(transformer, seed=0, batch=2, frames=3, height=4, width=6, text=7, glyphs=5, images=3):
    """Bare keyword arguments as the text-to-video pipeline builds them (zero condition and image rows)."""
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    latent = (config.in_channels - 1) // 2
    latents = torch.randn(batch, latent, frames, height, width, generator=g)
    mask = torch.ones(batch, text)
    mask[-1, -3:] = 0
    glyph_mask = torch.zeros(batch, glyphs)
    glyph_mask[0, :2] = 1  # glyph rows in the first prompt only
    return {
        "hidden_states": torch.cat([latents, torch.zeros_like(latents), torch.zeros_like(latents[:, :1])], dim=1),
        "timestep": torch.tensor([700.0, 350.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, text, config.text_embed_dim, generator=g),
        "encoder_attention_mask": mask,
        "encoder_hidden_states_2": torch.randn(batch, glyphs, config.text_embed_2_dim, generator=g),
        "encoder_attention_mask_2": glyph_mask,
        "image_embeds": torch.zeros(batch, images, config.image_embed_dim),
    }


# ---------------------------------------------------------------- the float64 oracle
def rope(x, cos, sin):
    """Rotate pairs ``(x[2i], x[2i+1])`` of ``x`` (B, N, H, D) by the angles of ``cos``/``sin`` (N, D)."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos[None, :, None] + turned * sin[None, :, None]


def attend(query, key, value, valid=None):
    """Softmax attention in float64, (B, S, H, D); ``valid`` (B, T) marks the keys that may be seen."""
    logits = torch.einsum("bshd,bthd->bhst", query, key) * query.shape[-1] ** -0.5
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.einsum("bhst,bthd->bshd", logits.softmax(-1), value)


def rms(norm, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def ada_zero(norm, x, emb):
    """AdaLN-Zero: (normed·(1 + scale) + shift, gate_msa, shift_mlp, scale_mlp, gate_mlp)."""
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = norm.linear(F.silu(emb)).chunk(6, dim=1)
    normed = F.layer_norm(x, x.shape[-1:], eps=norm.norm.eps)
    return normed * (1 + scale[:, None]) + shift[:, None], gate, shift_mlp, scale_mlp, gate_mlp


def refine_alone(refiner, rows, timestep):
    """The token refiner on one concept's rows alone: own mean as pooled vector, full self-attention."""
    temb = refiner.time_text_embed(timestep, rows.mean(1))
    hidden = refiner.proj_in(rows)
    for block in refiner.token_refiner.refiner_blocks:
        attn = block.attn
        normed = F.layer_norm(hidden, hidden.shape[-1:], block.norm1.weight, block.norm1.bias, block.norm1.eps)
        q, k, v = (p(normed).unflatten(-1, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        gate_msa, gate_mlp = block.norm_out.linear(F.silu(temb)).chunk(2, dim=1)
        hidden = hidden + attn.to_out[0](attend(q, k, v).flatten(2)) * gate_msa[:, None]
        normed = F.layer_norm(hidden, hidden.shape[-1:], block.norm2.weight, block.norm2.bias, block.norm2.eps)
        hidden = hidden + block.ff.net[2](F.silu(block.ff.net[0].proj(normed))) * gate_mlp[:, None]
    return hidden


def captured_run(transformer, inputs):
    """Each dual block's inputs and pre-projection video output, and the refiner's timestep, from a plain run."""
    captured, handles = {}, []
    for index, block in enumerate(transformer.transformer_blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, i=index: captured.__setitem__(i, (a, kw)), with_kwargs=True))
        handles.append(block.attn.to_out[0].register_forward_pre_hook(
            lambda m, a, i=index: captured.__setitem__(("o_x", i), a[0])))
    handles.append(transformer.context_embedder.register_forward_pre_hook(
        lambda m, a: captured.__setitem__("timestep", a[1])))
    try:
        with torch.no_grad():
            transformer(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def block_arguments(args, kwargs):
    """(video, text, temb, attention mask, (cos, sin)) of a dual block call, however they were passed."""
    x, text, temb = args[:3]
    mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
    rotary = args[4] if len(args) > 4 else kwargs.get("image_rotary_emb", kwargs.get("freqs_cis"))
    return x.double(), text.double(), temb.double(), mask, tuple(t.double() for t in rotary)


def concept_temb(model, inputs, temb, modulation):
    """The concept rows' modulation: the block's own, or HunyuanVideo 1.0's with a zero CLIP vector."""
    if modulation == "prompt" or not hasattr(model, "time_text_embed"):
        return temb
    pooled = torch.zeros_like(inputs["pooled_projections"]).double()
    return model.time_text_embed(inputs["timestep"].double(), pooled, inputs["guidance"].double())[0]


def oracle_maps(transformer, inputs, embeds, layers, softmax=True, space="output", modulation="prompt"):
    """Maps ``(B, N, C)`` recomputed in float64 from the block weights; block inputs come from a plain run.

    Video path: AdaLN-Zero, q/k/v, RMS qk-norm, RoPE on video queries and keys, attention over video and
    unmasked text keys (checked against the model's own output). Concept path: each concept refined alone
    (plus HunyuanVideo 1.5's text type row), then per block the text weights, attention over
    ``[video keys; concept keys]``, and the text stream's residual update.
    """
    captured = captured_run(transformer, inputs)
    model = copy.deepcopy(transformer).double()
    batch = inputs["hidden_states"].shape[0]
    timestep = captured["timestep"].double()
    with torch.no_grad():
        rows = [refine_alone(model.context_embedder, e.double().expand(batch, -1, -1), timestep) for e in embeds]
        concepts = torch.cat(rows, dim=1)
        if hasattr(model, "cond_type_embed"):
            concepts = concepts + model.cond_type_embed.weight[0]
        per_layer = []
        for index, block in enumerate(model.transformer_blocks[: max(layers) + 1]):
            x, text, temb, mask, (cos, sin) = block_arguments(*captured[index])
            attn = block.attn

            def project(norm_q, norm_k, projections, hidden):
                q, k, v = (p(hidden).unflatten(-1, (attn.heads, -1)) for p in projections)
                return rms(norm_q, q), rms(norm_k, k), v

            q_x, k_x, v_x = project(attn.norm_q, attn.norm_k, (attn.to_q, attn.to_k, attn.to_v),
                                    ada_zero(block.norm1, x, temb)[0])
            q_x, k_x = rope(q_x, cos, sin), rope(k_x, cos, sin)
            text_projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            _, k_t, v_t = project(attn.norm_added_q, attn.norm_added_k, text_projections,
                                  ada_zero(block.norm1_context, text, temb)[0])
            valid = mask[:, 0, 0].bool() if mask.dim() == 4 else F.pad(mask.bool(), (x.shape[1], 0), value=True)
            o_x = attend(q_x, torch.cat([k_x, k_t], 1), torch.cat([v_x, v_t], 1), valid)
            model_o_x = captured[("o_x", index)].double().unflatten(-1, (attn.heads, -1))
            assert torch.allclose(o_x, model_o_x, atol=1e-5), index  # the oracle's video path is the model's
            normed, gate_msa, shift, scale, gate_mlp = ada_zero(block.norm1_context, concepts,
                                                                concept_temb(model, inputs, temb, modulation))
            q_c, k_c, v_c = project(attn.norm_added_q, attn.norm_added_k, text_projections, normed)
            o_c = attend(q_c, torch.cat([k_x, k_c], 1), torch.cat([v_x, v_c], 1))
            if index in layers:
                image, concept = (o_x, o_c) if space == "output" else (v_x, v_c)
                per_layer.append(grouped_scores(torch.einsum("bnhd,brhd->bnr", image, concept), embeds, softmax))
            concepts = concepts + gate_msa[:, None] * attn.to_add_out(o_c.flatten(2))
            normed = F.layer_norm(concepts, concepts.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
            concepts = concepts + gate_mlp[:, None] * block.ff_context(normed)
    return torch.stack(per_layer).mean(0)


# ---------------------------------------------------------------- 1. conformance suites
class FusingIsANoOp:
    """diffusers' ``fuse_qkv_projections()`` does not fuse these models' (legacy ``Attention``) projections,
    and their processors always call ``to_q``/``to_k``/``to_v``: fusing by hand changes neither output nor map."""

    def test_fused_qkv_gives_the_same_maps(self):
        transformer = self.make_transformer(13)
        inputs = self.make_inputs(transformer, 0)
        embeds = concept_embeds(transformer)
        reference = record_maps(transformer, inputs, embeds)
        with torch.no_grad():
            plain = transformer(**inputs).sample
        transformer.fuse_qkv_projections()
        assert not any(getattr(b.attn, "fused_projections", False) for b in transformer.transformer_blocks)
        for block in transformer.transformer_blocks:
            block.attn.fuse_projections()  # by hand: to_qkv and to_added_qkv appear, the processor ignores them
        assert all(hasattr(b.attn, "to_qkv") for b in transformer.transformer_blocks)
        fused = assert_output_unchanged(transformer, inputs, embeds)
        with torch.no_grad():
            assert torch.equal(transformer(**inputs).sample, plain)
        assert torch.equal(fused.maps.tensor, reference.maps.tensor)


class HunyuanVideoCase(FusingIsANoOp):
    """Tiny HunyuanVideo 1.0 (4 dual + 1 single block, embedded guidance); the pipeline runs true CFG."""

    oracle_options = {"concept_modulation": "prompt"}
    oracle_spaces = ("output", "value")
    pipeline_grid = (3, 2, 3)

    def make_transformer(self, seed):
        return hv_transformer(seed)

    def make_inputs(self, transformer, seed):
        return hv_inputs(transformer, seed)

    def expected_grid(self, inputs):
        return (3, 2, 3)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, softmax, space)

    def make_pipeline(self):
        return hv_pipeline()

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2):
        return hv_generate(pipe, prompt, guidance, negative, steps)


class TestHunyuanVideo(HunyuanVideoCase, AdapterContract):
    pass


class HunyuanVideo15Case(FusingIsANoOp):
    """Tiny HunyuanVideo 1.5 (4 dual blocks, glyph and image rows); the pipeline's guider runs CFG."""

    oracle_spaces = ("output", "value")
    pipeline_grid = (3, 2, 3)

    def make_transformer(self, seed):
        return hv15_transformer(seed)

    def make_inputs(self, transformer, seed):
        return hv15_inputs(transformer, seed)

    def expected_grid(self, inputs):
        return (3, 2, 3)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, softmax, space)

    def make_pipeline(self):
        return hv15_pipeline()

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2):
        return hv15_generate(pipe, prompt, guidance, negative, steps)


class TestHunyuanVideo15(HunyuanVideo15Case, AdapterContract):
    pass


# ---------------------------------------------------------------- 2. modulation, concept tokens, image-to-video
@pytest.fixture(scope="module")
def pipes():
    built = {"1.0": hv_pipeline(seed=1), "1.5": hv15_pipeline(seed=1)}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


def test_zero_modulation_recomputes_the_embedding_with_a_zero_clip_vector():
    transformer = hv_transformer(seed=5)
    embeds = concept_embeds(transformer)
    inputs = hv_inputs(transformer, seed=2)

    def run(modulation):
        return as_tokens(record_maps(transformer, inputs, embeds, layers=[1, 3], concept_modulation=modulation).maps)

    zero = run("zero").double()
    assert ConceptAttention(transformer, ["a", "b", "c"], concept_embeds=embeds).concept_modulation == "zero"
    assert torch.allclose(zero, oracle_maps(transformer, inputs, embeds, [1, 3], modulation="zero"), atol=1e-5)
    assert not torch.allclose(zero, run("prompt").double(), atol=1e-4)
    # HunyuanVideo 1.5 modulates by the timestep only: both choices are the same stream
    transformer = hv15_transformer(seed=5)
    inputs = hv15_inputs(transformer, seed=2)
    assert torch.equal(run("zero"), run("prompt"))


def test_concepts_are_refined_alone_whatever_the_prompt():
    """The refined concept rows entering block 0 depend on the timestep, not on the prompt or its padding."""
    transformer = hv15_transformer(seed=6)
    embeds = concept_embeds(transformer)
    seen = []
    hook = transformer.transformer_blocks[0].attn.add_q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    try:
        for seed in (0, 1):
            record_maps(transformer, hv15_inputs(transformer, seed=seed), embeds, layers=[0])
        inputs = hv15_inputs(transformer, seed=0)
        record_maps(transformer, dict(inputs, timestep=torch.tensor([100.0, 350.0])), embeds, layers=[0])
    finally:
        hook.remove()
    rows = 4  # concept rows are the last ones normed by the text projections of block 0 (after the prompt's)
    first, other_prompt, other_time = (s[:, -rows:] for s in seen[1::2])
    assert torch.allclose(first, other_prompt, atol=1e-6)
    assert torch.allclose(first[1], other_time[1], atol=1e-6) and not torch.allclose(first[0], other_time[0])


def concept_rows_by_hand(pipe, version, words):
    """The rows of ``words`` in the pipeline's encoding of the prompt ``words``, located in its templated ids."""
    tokenizer = pipe.tokenizer
    if version == "1.0":
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        ids = tokenizer(DEFAULT_PROMPT_TEMPLATE["template"].format(words))["input_ids"]
        crop = DEFAULT_PROMPT_TEMPLATE["crop_start"]
    else:
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

        ids = tokenizer.apply_chat_template(format_text_input([words], pipe.system_message), tokenize=True,
                                            add_generation_prompt=True, return_dict=True)["input_ids"][0]
        crop = pipe.prompt_template_encode_start_idx
    embeds = pipe.encode_prompt(words, device="cpu")[0][0]
    own = tokenizer(words, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i:i + len(own)] == own)
    return embeds[start - crop: start - crop + len(own)]


@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_concept_rows_are_the_concepts_own_tokens_inside_the_prompt_template(version, pipes):
    pipe = pipes[version]
    with torch.no_grad():
        ca = ConceptAttention(pipe, ["dog", "traffic light"])
        assert [e.shape[0] for e in ca.concept_embeds] == [1, 2]
        for name, rows in zip(["dog", "traffic light"], ca.concept_embeds):
            assert torch.allclose(rows, concept_rows_by_hand(pipe, version, name).float(), atol=1e-5)


def test_token_replace_image_to_video_transformer():
    """HunyuanVideo-I2V's token-replace blocks modulate the first frame apart; the text side (and so the
    concept stream) is unchanged. Outputs stay bit-identical; real videos are refused (they need an image)."""
    transformer = hv_transformer(seed=7, condition="token_replace")
    inputs = hv_inputs(transformer, seed=1)
    ca = assert_output_unchanged(transformer, inputs)
    assert ca.maps.tensor.shape == (2, 3, 3, 2, 3)
    assert torch.allclose(ca.maps.tensor.sum(1), torch.ones(2, 3, 2, 3), atol=1e-5)
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline(**{**hv_pipeline().components, "transformer": transformer})
    with pytest.raises(TypeError, match="image-to-video transformer"):
        explain_video(pipe, clip(9), CONCEPTS, size=(48, 32))


def test_skyreels_image_to_video_pipeline_maps_the_prompt_calls_of_its_unnamed_cfg():
    """``HunyuanSkyreelsImageToVideoPipeline`` calls the prompt, then the negative prompt, without cache_context
    (image latents concatenated to the video's): its layout is "sequential"."""
    from diffusers import HunyuanSkyreelsImageToVideoPipeline, HunyuanVideoTransformer3DModel
    from PIL import Image

    torch.manual_seed(8)
    transformer = HunyuanVideoTransformer3DModel(**{**hv_transformer().config, "in_channels": 8}).eval()
    pipe = HunyuanSkyreelsImageToVideoPipeline(**{**hv_pipeline().components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (48, 32), (120, 60, 20))

    def run(negative, **options):
        with ConceptAttention(pipe, CONCEPTS, **options) as ca:
            latents = pipe(image=image, prompt="a dog by a tree", negative_prompt=negative, height=32, width=48,
                           num_frames=9, num_inference_steps=2, max_sequence_length=16, output_type="latent",
                           generator=torch.Generator().manual_seed(0)).frames
        return latents, ca.maps

    plain = pipe(image=image, prompt="a dog by a tree", negative_prompt="a cat", height=32, width=48, num_frames=9,
                 num_inference_steps=2, max_sequence_length=16, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).frames
    watched, guided = run("a cat")
    assert torch.equal(plain, watched) and guided.steps == [0, 1] and guided.tensor.shape == (1, 3, 3, 2, 3)
    assert run("a cat", cfg="none")[1].steps == [0, 1, 2, 3]  # every call, were they not told apart
    first = run("a cat", timesteps=[0])[1].tensor
    assert torch.allclose(first, run(None, timesteps=[0])[1].tensor, atol=1e-6)  # no CFG: the prompt's call alone
    assert torch.allclose(first, run("grass", timesteps=[0])[1].tensor, atol=1e-6)


# ---------------------------------------------------------------- 3. real videos, command line, web app
def clip(frames=9, width=48, height=32, seed=0):
    return (np.random.default_rng(seed).random((frames, height, width, 3)) * 255).astype(np.uint8)


def inputs_by_hand(pipe, version, source, prompt, t, seed, samples):
    """Transformer inputs rebuilt independently: VAE mode × scaling, flow-matching noise, text-to-video text."""
    pixels = pipe.video_processor.preprocess_video(video.to_frames(source), height=32, width=48)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
        frames_first = (samples, latents.shape[2], latents.shape[1], *latents.shape[3:])  # as explain_video draws
        noise = torch.randn(frames_first, generator=torch.Generator().manual_seed(seed)).transpose(1, 2)
        noised = (1 - t) * latents + t * noise
        timestep = torch.full((1,), 1000.0 * t)
        if version == "1.0":
            embeds, pooled, mask = pipe.encode_prompt(prompt, device="cpu")
            shared = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "pooled_projections": pooled,
                      "guidance": torch.full((1,), 6000.0)}
        else:
            embeds, mask, glyphs, glyphs_mask = pipe.encode_prompt(prompt, device="cpu")
            shared = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                      "encoder_hidden_states_2": glyphs, "encoder_attention_mask_2": glyphs_mask,
                      "image_embeds": torch.zeros(1, pipe.vision_num_semantic_tokens, pipe.vision_states_dim)}
            noised = torch.cat([noised, torch.zeros_like(noised), torch.zeros_like(noised[:, :1])], dim=1)
    return [dict(shared, hidden_states=noised[i:i + 1], timestep=timestep, return_dict=False) for i in range(samples)]


@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_explain_video_equals_independent_sessions_and_exits_early(version, pipes):
    pipe = pipes[version]
    source = clip(9, seed=5)
    transformer = pipe.transformer
    per_sample = inputs_by_hand(pipe, version, source, "a dog", 0.7, seed=3, samples=2)
    with torch.no_grad():
        before = [transformer(**inputs)[0] for inputs in per_sample]
    ran = []
    handles = [block.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
               for i, block in enumerate(transformer.transformer_blocks)]
    handles += [block.register_forward_pre_hook(lambda m, a: ran.append("single"))
                for block in getattr(transformer, "single_transformer_blocks", [])]
    try:
        maps = explain_video(pipe, source, CONCEPTS, prompt="a dog", timestep=0.7, num_samples=2, seed=3,
                             size=(48, 32), layers=[1, 2])
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [0, 1, 2]  # one batched forward, stopped after block 2
    assert maps.tensor.shape == (1, 3, 3, 2, 3) and maps.meta["model_timestep"] == pytest.approx(0.7)
    assert len(maps.frames) == 9 and maps.meta["latent_frames"] == 3
    sessions = []
    for inputs, plain in zip(per_sample, before):
        with torch.no_grad(), ConceptAttention(pipe, CONCEPTS, layers=[1, 2]) as session:
            assert torch.equal(transformer(**inputs)[0], plain)
        sessions.append(session.maps.tensor)
    assert torch.allclose(maps.tensor, torch.stack(sessions).mean(0), atol=1e-5)
    with torch.no_grad():
        assert all(torch.equal(transformer(**inputs)[0], b) for inputs, b in zip(per_sample, before))


@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_cli_generates_and_explains_videos(version, pipes, tmp_path, capsys):
    import json

    from concept_attention.cli import main

    model = tmp_path / "model"
    pipes[version].save_pretrained(model)
    (model / "concept_attention.json").write_text(json.dumps({"size": 32, "num_inference_steps": 2,
                                                              "max_sequence_length": 16}))
    out = tmp_path / "generated"
    code = main(["generate", "a dog", "--model", str(model), "--concepts", "dog,sky", "--size", "48x32",
                 "--frames", "9", "--out", str(out), "--no-figure", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert ConceptMaps.load(out).tensor.shape == (1, 2, 3, 2, 3)
    assert video.read_video(out / "dog.mp4").shape == (9, 32, 48, 3)
    source = video.write_video(tmp_path / "clip.mp4", list(clip(9, seed=9)))
    code = main(["explain", str(source), "--model", str(model), "--concepts", "dog,sky", "--samples", "1",
                 "--out", str(tmp_path / "explained"), "--device", "cpu"])  # size: the model's 32 px shorter side
    assert code == 0, capsys.readouterr().err
    explained = ConceptMaps.load(tmp_path / "explained")
    assert explained.tensor.shape == (1, 2, 3, 2, 3) and explained.meta["model_size"] == [48, 32]


@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_web_app_generates_and_explains(version, pipes, tmp_path):
    from concept_attention.app import ConceptApp

    pipe = pipes[version]
    pipe.concept_attention_defaults = {"size": 32}
    try:
        app = ConceptApp(pipe)
        assert app.video and app.frame_counts()[:2] == [5, 9]
        generated = app.run_generate("a dog by a tree", "dog, tree", 0, 2, 48, 32, frames=9)
        source = video.write_video(tmp_path / "clip.mp4", list(clip(9, seed=4)))
        explained = app.run_explain(str(source), "dog, sky", "", 0.5, 1, 1, 2, frames=9)
    finally:
        del pipe.concept_attention_defaults
    for views in (generated, explained):
        assert views[0] and len(views[1]) == 2  # the video and one heat-map video per concept
