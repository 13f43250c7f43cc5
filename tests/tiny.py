"""Tiny random-config diffusers models for tests (built offline, in milliseconds)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

WORDS = [
    "a", "an", "the", "dog", "cat", "tree", "sky", "grass", "by", "on", "in", "red", "blue", "green",
    "car", "house", "background", "sun", "sky", "scraper", "traffic", "light", "photo", "of", "and",
]


def t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(WORDS)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("▁", -3.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def clip_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in dict.fromkeys(WORDS):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            merges.append((parts[0], parts[1]))
            vocab_list.append(merged)
            parts = [merged] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=16)


def flux_transformer(seed: int = 0, guidance: bool = False, layers: int = 4, single: int = 1):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    return model.eval()


def flux_pipeline(seed: int = 0, layers: int = 4, guidance: bool = False):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
        eos_token_id=clip_tok.eos_token_id, bos_token_id=clip_tok.bos_token_id, pad_token_id=clip_tok.eos_token_id,
    )).eval()
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.06, scaling_factor=1.5,
    ).eval()
    transformer = flux_transformer(seed, guidance=guidance, layers=layers)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer,
    )


def generate(pipe, prompt="a dog by a tree", **kwargs):
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("max_sequence_length", 16)
    kwargs.setdefault("output_type", "latent")
    generator = torch.Generator().manual_seed(kwargs.pop("seed", 0))
    return pipe(prompt, generator=generator, **kwargs).images


def flux_inputs(transformer, batch=2, height=4, width=6, text=5, seed=0, pooled_zero=False):
    """FluxTransformer2DModel keyword arguments: random latents and prompt on a height × width grid."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    inputs = {
        "hidden_states": torch.randn(batch, height * width, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.zeros(batch, cfg.pooled_projection_dim)
        if pooled_zero
        else torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.full((batch,), 0.6),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, height, width, "cpu", torch.float32),
        "txt_ids": torch.zeros(text, 3),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs
