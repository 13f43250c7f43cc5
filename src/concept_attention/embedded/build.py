"""Build the parts of the embedded default model: a small FLUX.1-architecture text-to-image pipeline.

Everything is constructed offline, in memory, from configs (no downloads):

* word-level tokenizers: a byte-level BPE ``CLIPTokenizer`` whose merges make each vocabulary word
  a single token, and a Unigram ``T5Tokenizer`` with one ``"▁word"`` piece per vocabulary word
  (unknown words fall back to characters / ``<unk>``; they never crash);
* tiny ``T5EncoderModel`` (d_model 64, 2 layers, 4 heads) whose relative-position bias is set by hand
  so that each head looks at one neighbour (self, previous, next, previous-but-one word): a word's
  state then carries its neighbours' words, e.g. "circle" in "a red circle" carries "red"
  (:func:`set_local_position_bias`); and ``CLIPTextModel`` (hidden 64, 2 layers);
* ``AutoencoderKL`` with three levels (``vae_scale_factor`` 4, 8 latent channels): a 128x128 image
  becomes a 32x32x8 latent, packed 2x2 into 16x16 = 256 tokens of 32 channels;
* ``FlowMatchEulerDiscreteScheduler``;
* ``FluxTransformer2DModel`` (4 double + 2 single blocks, 4 heads x 32, text width 64).

``build_pipeline()`` assembles a genuine ``diffusers.FluxPipeline``. It saves with
``save_pretrained`` and loads back with ``FluxPipeline.from_pretrained``. Always generate with
``height=width=DEFAULT_SIZE`` and ``max_sequence_length=MAX_SEQUENCE_LENGTH``.
"""
from __future__ import annotations

import torch

DEFAULT_SIZE = 128
MAX_SEQUENCE_LENGTH = 16
CLIP_MAX_LENGTH = 16

#: words that get a single token in both tokenizers
VOCAB_WORDS = (
    # caption words
    "a", "and", "on", "object", "background",
    "circle", "square", "triangle", "cross",
    "red", "green", "blue", "yellow",
    "grass", "sky", "wall",
    # generic words
    "the", "an", "of", "in", "with", "image", "photo", "picture", "shape", "colour", "color",
    "left", "right", "top", "bottom", "thing", "scene", "big", "small",
)

TEXT_DIM = 64

VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=8, norm_num_groups=8,
    sample_size=DEFAULT_SIZE, mid_block_add_attention=False,
    use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=1.0, shift_factor=0.0,
)

TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=32, out_channels=None, num_layers=4, num_single_layers=2,
    attention_head_dim=32, num_attention_heads=4, joint_attention_dim=TEXT_DIM,
    pooled_projection_dim=TEXT_DIM, guidance_embeds=False, axes_dims_rope=(8, 12, 12),
)

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


# --------------------------------------------------------------------------- tokenizers
def build_clip_tokenizer(words=VOCAB_WORDS, model_max_length: int = CLIP_MAX_LENGTH):
    """Byte-level BPE CLIP tokenizer where every word of ``words`` is one token."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def bpe(symbols):  # BPE with the merges so far (lowest rank first)
        while len(symbols) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
            r, i = min(pairs)
            if r == 1 << 30:
                break
            symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
        return symbols

    for w in words:
        # segment with the merges so far, then append merges joining the pieces left to right;
        # appended merges have the lowest priority, so earlier words still become one token
        symbols = bpe(list(w[:-1]) + [w[-1] + "</w>"])
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            symbols = [merged] + symbols[2:]
    # specials at the end, so the EOS id is not 2 (CLIPTextModel treats eos_token_id == 2 as legacy)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = model_max_length
    return tok


def build_t5_tokenizer(words=VOCAB_WORDS, model_max_length: int = MAX_SEQUENCE_LENGTH):
    """Unigram T5 tokenizer where every word of ``words`` is one ``"▁word"`` piece."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -1.0) for w in words]
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces += [(c, -8.0) for c in letters] + [(c.upper(), -8.0) for c in letters[:26]]
    pieces += [(c, -9.0) for c in ".,;:!?'-\"()"]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = model_max_length
    return tok


# --------------------------------------------------------------------------- models
def build_clip_text_model(tokenizer, seed: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

    if seed is not None:
        torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=TEXT_DIM, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(cfg)


def build_t5_encoder(tokenizer, seed: int | None = None, local_bias: bool = True):
    """The frozen T5 of the embedded model (``local_bias=False``: T5's own random position bias, for probes)."""
    from transformers import T5Config, T5EncoderModel

    if seed is not None:
        torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=16, d_ff=4 * TEXT_DIM, num_layers=2,
        num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=32,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    encoder = T5EncoderModel(cfg)
    return set_local_position_bias(encoder) if local_bias else encoder


#: (head, relative position of the word it reads) for :func:`set_local_position_bias`
LOCAL_HEADS = ((0, 0), (1, -1), (2, 1), (3, -2))
LOCAL_BIAS = 4.0


def set_local_position_bias(encoder, heads=LOCAL_HEADS, strength: float = LOCAL_BIAS):
    """Make each T5 attention head prefer one neighbouring word; returns ``encoder``.

    T5 adds a learned bias per (relative-position bucket, head) to every layer's attention logits.
    Setting it to ``strength`` at one offset per head and 0 elsewhere makes a frozen random T5
    mix each word with its neighbours, so a shape word carries its own colour word and vice versa
    (measured: ``scripts/probe_text_encoder.py``). Word order in the caption stays free.
    """
    from transformers.models.t5.modeling_t5 import T5Attention

    attention = encoder.encoder.block[0].layer[0].SelfAttention
    offsets = torch.tensor([offset for _, offset in heads])
    buckets = T5Attention._relative_position_bucket(
        offsets, bidirectional=True, num_buckets=attention.relative_attention_num_buckets,
        max_distance=attention.relative_attention_max_distance)
    with torch.no_grad():
        weight = attention.relative_attention_bias.weight  # (buckets, heads)
        weight.zero_()
        for (head, _), bucket in zip(heads, buckets.tolist()):
            weight[bucket, head] = strength
    return encoder


def build_vae(seed: int | None = None, **overrides):
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    return AutoencoderKL(**{**VAE_CONFIG, **overrides})


def build_transformer(seed: int | None = None, **overrides):
    from diffusers import FluxTransformer2DModel

    if seed is not None:
        torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, **overrides})


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def assemble_pipeline(*, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                      scheduler=None):
    """A genuine ``diffusers.FluxPipeline`` from the parts (fp32, eval mode)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        scheduler=scheduler if scheduler is not None else build_scheduler(),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    return finalize_pipeline(pipe)


def finalize_pipeline(pipe):
    """fp32 + eval mode for every module; returns ``pipe``."""
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name, None)
        if m is not None:
            if any(p.dtype != torch.float32 for p in m.parameters()):
                m.to(torch.float32)
            m.eval()
    return pipe


def build_pipeline(seed: int = 0, vae=None):
    """A randomly initialised embedded pipeline (or with the given, e.g. trained, VAE)."""
    tok = build_clip_tokenizer()
    tok2 = build_t5_tokenizer()
    return assemble_pipeline(
        transformer=build_transformer(seed),
        vae=vae if vae is not None else build_vae(seed + 1),
        text_encoder=build_clip_text_model(tok, seed + 2), tokenizer=tok,
        text_encoder_2=build_t5_encoder(tok2, seed + 3), tokenizer_2=tok2,
    )

