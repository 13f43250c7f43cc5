"""Tiny random-config FLUX.2 (Klein) and CogVideoX models and pipelines for tests (offline, fast)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import tiny

# A minimal Qwen-style chat template: the FLUX.2 Klein pipeline wraps every prompt in it.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_LAYERS = 27  # the Klein pipeline stacks hidden states 9, 18 and 27
QWEN_WIDTH = 16


def qwen_tokenizer():
    """A byte-level BPE tokenizer with one token per known word and the chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab_list = list(alphabet)
    merges = []
    space = bytes_to_unicode()[ord(" ")]
    words = list(dict.fromkeys(tiny.WORDS + ["user", "assistant", "system"]))
    for word in words:
        parts = list(word)
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
            vocab_list.append(merged)
            parts = [merged] + parts[2:]
        merges.append((space, word))
        vocab_list.append(space + word)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    model.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"], model_max_length=64,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qwen_encoder(tokenizer, seed: int = 0, layers: int = QWEN_LAYERS):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=QWEN_WIDTH, intermediate_size=24, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config).eval()


def flux2_transformer(seed: int = 0, layers: int = 4, single: int = 1, guidance: bool = False,
                      text_dim: int = 3 * QWEN_WIDTH):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_dim, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance,
    )
    return model.eval()


def flux2_vae():
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    return AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()


def flux2_klein_pipeline(seed: int = 0, layers: int = 4, is_distilled: bool = True):
    """A tiny ``Flux2KleinPipeline`` (Qwen3 chat-template encoder, 4-axis RoPE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    tokenizer = qwen_tokenizer()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_vae(), text_encoder=qwen_encoder(tokenizer, seed),
        tokenizer=tokenizer, transformer=flux2_transformer(seed, layers=layers), is_distilled=is_distilled,
    )


def flux2_dev_pipeline(seed: int = 0, layers: int = 4):
    """A tiny ``Flux2Pipeline`` (FLUX.2 dev layout: system message in the chat template, layers 10/20/30).

    The real pipeline uses Mistral-3 and its processor; a Qwen3 stand-in with 30 layers and a
    tokenizer that renders the same message structure exercises the same code path.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    tokenizer = qwen_tokenizer()
    tokenizer.model_max_length = 512
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_vae(),
        text_encoder=qwen_encoder(tokenizer, seed, layers=30), tokenizer=tokenizer,
        transformer=flux2_transformer(seed, layers=layers, guidance=True),
    )


def flux2_generate(pipe, prompt="a dog by a tree", **kwargs):
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("max_sequence_length", 32)
    kwargs.setdefault("guidance_scale", 1.0)
    kwargs.setdefault("output_type", "latent")
    generator = torch.Generator().manual_seed(kwargs.pop("seed", 0))
    return pipe(prompt=prompt, generator=generator, **kwargs).images


# ------------------------------------------------------------------ CogVideoX
def cogvideox_transformer(seed: int = 0, layers: int = 4, rope: bool = False, patch_size_t: int | None = None,
                          text_len: int = 16, in_channels: int = 4):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=in_channels, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=layers, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=patch_size_t, max_text_seq_length=text_len, use_rotary_positional_embeddings=rope,
    )
    return model.eval()


def cogvideox_rotary(transformer, frames: int, height: int, width: int):
    """The RoPE tables the CogVideoX pipeline builds for a latent video of ``frames`` × ``height`` × ``width``."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p = transformer.config.patch_size
    p_t = transformer.config.patch_size_t
    grid_h, grid_w = height // p, width // p
    temporal = frames if p_t is None else (frames + p_t - 1) // p_t
    return get_3d_rotary_pos_embed(
        embed_dim=transformer.config.attention_head_dim, crops_coords=((0, 0), (grid_h, grid_w)),
        grid_size=(grid_h, grid_w), temporal_size=temporal, device="cpu",
    )


def cogvideox_vae():
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    return AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D", "CogVideoXDownBlock3D", "CogVideoXDownBlock3D"),
        up_block_types=("CogVideoXUpBlock3D", "CogVideoXUpBlock3D", "CogVideoXUpBlock3D"),
        block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()


def cogvideox_pipeline(seed: int = 0, layers: int = 4, rope: bool = False, image_to_video: bool = False):
    """A tiny ``CogVideoXPipeline`` (or ``CogVideoXImageToVideoPipeline``: latents ‖ image latents in)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline, CogVideoXPipeline
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny.t5_tokenizer()
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )).eval()
    kind = CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline
    transformer = cogvideox_transformer(seed, layers=layers, rope=rope, in_channels=8 if image_to_video else 4)
    return kind(
        tokenizer=tokenizer, text_encoder=t5, vae=cogvideox_vae(), transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )


def cogvideox_generate(pipe, prompt="a dog by a tree", **kwargs):
    kwargs.setdefault("height", 16)
    kwargs.setdefault("width", 24)
    kwargs.setdefault("num_frames", 9)
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("max_sequence_length", 16)
    kwargs.setdefault("guidance_scale", 6.0)
    kwargs.setdefault("output_type", "latent")
    generator = torch.Generator().manual_seed(kwargs.pop("seed", 0))
    return pipe(prompt=prompt, generator=generator, **kwargs).frames


# ------------------------------------------------------------------ memory
class LiveTensorBytes:
    """Context manager measuring the peak bytes of tensor storages created inside it and still alive.

    Every aten op's outputs are seen through a ``TorchDispatchMode``; a storage counts from its first
    appearance until the last tracked tensor using it is garbage-collected. Deterministic, CPU-only.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._entries: dict[int, list[int]] = {}
        self._mode = None

    def __enter__(self) -> "LiveTensorBytes":
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        def release(pointer: int) -> None:
            entry = tracker._entries.get(pointer)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                tracker.live -= entry[0]
                del tracker._entries[pointer]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for leaf in tree_leaves(out):
                    if isinstance(leaf, torch.Tensor) and not leaf.is_meta:
                        storage = leaf.untyped_storage()
                        pointer = storage.data_ptr()
                        if pointer == 0:
                            continue
                        entry = tracker._entries.get(pointer)
                        if entry is None:
                            entry = tracker._entries[pointer] = [storage.nbytes(), 0]
                            tracker.live += entry[0]
                            tracker.peak = max(tracker.peak, tracker.live)
                        entry[1] += 1
                        weakref.finalize(leaf, release, pointer)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._mode.__exit__(*exc_info)
