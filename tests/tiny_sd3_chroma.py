"""Tiny random-config SD3 / SD3.5 and Chroma models and pipelines for tests (offline, fast)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from tiny import clip_tokenizer, t5_tokenizer


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.06, scaling_factor=1.5,
    ).eval()


def tiny_t5(tokenizer, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )).eval()


# ---------------------------------------------------------------- SD3 / SD3.5
def sd3_transformer(
    seed: int = 0, layers: int = 3, dual_attention_layers: tuple[int, ...] = (), qk_norm: str | None = None
):
    """SD3-like (``qk_norm=None``, no dual attention) or SD3.5-like MMDiT with 2 heads × 16."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        out_channels=4, pos_embed_max_size=16, dual_attention_layers=dual_attention_layers, qk_norm=qk_norm,
    )
    return model.eval()


def sd3_pipeline(seed: int = 0, layers: int = 3, t5: bool = True, **transformer_options):
    """A StableDiffusion3Pipeline with two tiny CLIPs (hidden 16 and 8, projections 16+16 = pooled 32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok_l, tok_g, tok_t5 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)

    def clip(hidden: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok_l), hidden_size=hidden, intermediate_size=37, num_attention_heads=2,
            num_hidden_layers=2, max_position_embeddings=77, projection_dim=16,
            eos_token_id=tok_l.eos_token_id, bos_token_id=tok_l.bos_token_id, pad_token_id=tok_l.eos_token_id,
        )).eval()

    clip_l, clip_g = clip(16), clip(8)
    t5_model = tiny_t5(tok_t5, seed) if t5 else None
    transformer = sd3_transformer(seed, layers=layers, **transformer_options)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(),
        text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g,
        text_encoder_3=t5_model, tokenizer_3=tok_t5 if t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_inputs(transformer, batch: int = 2, height: int = 8, width: int = 12, text: int = 5, seed: int = 0):
    """Transformer kwargs: a (batch, C, height, width) latent (grid height/2 × width/2)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, height, width, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.full((batch,), 600.0),
    }


# ---------------------------------------------------------------- Chroma
def chroma_transformer(seed: int = 0, layers: int = 3, single: int = 1):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    model = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1,
    )
    return model.eval()


def chroma_pipeline(seed: int = 0, layers: int = 3):
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    tok = t5_tokenizer()
    text_encoder = tiny_t5(tok, seed)
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tok,
        transformer=chroma_transformer(seed, layers=layers),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chroma_inputs(transformer, batch: int = 2, height: int = 4, width: int = 6, text: int = 5, padded: int = 2,
                  seed: int = 0):
    """Chroma kwargs with a T5 padding mask: the last ``padded`` text tokens of row 0 are padding."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    mask = torch.ones(batch, text + height * width)
    if padded:
        mask[0, text - padded + 1:text] = 0.0  # Chroma keeps the first padding token visible
    return {
        "hidden_states": torch.randn(batch, height * width, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim, generator=g),
        "timestep": torch.full((batch,), 0.6),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, height, width, "cpu", torch.float32),
        "txt_ids": torch.zeros(text, 3),
        "attention_mask": mask,
    }


def generate(pipe, prompt="a dog by a tree", **kwargs):
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("max_sequence_length", 16)
    kwargs.setdefault("output_type", "latent")
    generator = torch.Generator().manual_seed(kwargs.pop("seed", 0))
    return pipe(prompt, generator=generator, **kwargs).images
