import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import torch

from concept_attention.embedded import (
    DEFAULT_SIZE, MAX_SEQUENCE_LENGTH, VOCAB_WORDS, build_clip_text_model, build_clip_tokenizer, build_pipeline, build_t5_tokenizer,
)
from concept_attention.loading import load_pipeline
from concept_attention.scenes import CAPTION_WORDS


def test_tokenizers_one_token_per_word():
    clip, t5 = build_clip_tokenizer(), build_t5_tokenizer()
    assert set(CAPTION_WORDS) <= set(VOCAB_WORDS)
    for w in VOCAB_WORDS:
        ids = clip(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, clip.convert_ids_to_tokens(ids))
        ids = t5(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, t5.convert_ids_to_tokens(ids))
    cap = "a red circle and a blue square on grass"
    assert len(t5(cap).input_ids) == len(cap.split()) + 1  # + </s>
    assert len(clip(cap).input_ids) == len(cap.split()) + 2  # <sot> ... <eot>
    # unknown words do not crash
    for s in ("a zebra on the moon!", "", "ÄÖÜ 123"):
        clip(s, padding="max_length", max_length=clip.model_max_length, truncation=True)
        t5(s, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True)


def test_clip_pooler_reads_eos():
    tok = build_clip_tokenizer()
    te = build_clip_text_model(tok, seed=0).eval()
    assert te.config.eos_token_id == tok.eos_token_id != 2
    enc = tok(["red", "a red circle on grass"], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt")
    with torch.no_grad():
        out = te(enc.input_ids)
    eos_pos = (enc.input_ids == tok.eos_token_id).int().argmax(-1)
    expect = out.last_hidden_state[torch.arange(2), eos_pos]
    assert torch.allclose(out.pooler_output, expect)
    assert eos_pos.tolist() == [2, 6]


def test_pipeline_save_load_generate(tmp_path):
    from diffusers import FluxPipeline

    pipe = build_pipeline(seed=0)
    assert pipe.vae_scale_factor == 4  # 128 px -> 32x32 latents -> 16x16 packed tokens
    assert not pipe.transformer.training and not pipe.text_encoder_2.training
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = FluxPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(loaded, name)
        assert not m.training
        assert all(p.dtype == torch.float32 for p in m.parameters())
    kw = dict(height=DEFAULT_SIZE, width=DEFAULT_SIZE, num_inference_steps=2,
              max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="np")
    a = pipe("a red circle on grass", generator=torch.Generator().manual_seed(0), **kw).images
    b = loaded("a red circle on grass", generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (1, DEFAULT_SIZE, DEFAULT_SIZE, 3)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # fp16 storage loads back as fp32
    loaded.to(torch.float16)
    loaded.save_pretrained(tmp_path / "fp16")
    back = load_pipeline(tmp_path / "fp16")
    assert all(p.dtype == torch.float32 for p in back.transformer.parameters())
    assert not back.transformer.training


def test_t5_words_carry_their_neighbours():
    """The hand-set local position bias: a shape word's state depends on the colour word before it."""
    from concept_attention.embedded import LOCAL_BIAS, build_t5_encoder

    tokenizer = build_t5_tokenizer()
    encoder = build_t5_encoder(tokenizer, seed=3).eval()
    bias = encoder.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert int((bias == LOCAL_BIAS).sum()) == 4 and int((bias != 0).sum()) == 4
    ids = tokenizer(["a red circle on grass", "a blue circle on grass", "a red square on grass"],
                    return_tensors="pt").input_ids
    with torch.no_grad():
        states = encoder(ids)[0]
    circle_red, circle_blue, square_red = states[0, 2], states[1, 2], states[2, 2]
    assert not torch.allclose(circle_red, circle_blue, atol=1e-3)  # "circle" carries its colour word
    cos = torch.nn.functional.cosine_similarity
    assert cos(circle_red, circle_blue, dim=0) > cos(circle_red, square_red, dim=0)  # ... and stays "circle"
