"""Steps several families share (adapters/common.py, wrapping.py, encoding.py)."""

import pytest
import torch

import tiny
from concept_attention.adapters.common import grid_from_ids, guidance_scale, latent_size_rule, timestep_value
from concept_attention.adapters.encoding import call_default, encode_with_t5, select_rows, sequence_length
from concept_attention.adapters.wrapping import clip_to_dtype, modulated, text_stream_update


def test_sizes_timesteps_and_grids():
    class Pipe:
        vae_scale_factor, default_sample_size = 8, 64

    assert latent_size_rule(Pipe(), 2) == (512, 16)
    assert timestep_value(torch.tensor([0.25, 0.5]), position=-1) == 0.5 and timestep_value(3) == 3.0
    assert timestep_value(None) is None
    ids = torch.stack([torch.zeros(6), torch.arange(6) // 3, torch.arange(6) % 3], dim=1)
    assert grid_from_ids(ids) == (2, 3)
    with pytest.raises(ValueError, match="cannot read an image grid"):
        grid_from_ids(ids[:5])


def test_guidance_scale_reads_the_first_named_argument():
    class Bound:
        arguments = {"guidance_scale": None, "true_cfg_scale": 4}

    assert guidance_scale(Bound(), "guidance_scale", "true_cfg_scale") == 4.0
    assert guidance_scale(Bound(), "missing") == 0.0


def test_text_stream_update_is_the_block_formula():
    torch.manual_seed(0)
    rows, attended = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    gate, shift, scale, gate2 = (torch.randn(2, 1, 4) for _ in range(4))
    norm, ff = torch.nn.LayerNorm(4, elementwise_affine=False), torch.nn.Linear(4, 4)
    out = text_stream_update(rows, attended, gate, modulated(norm, shift, scale), gate2, ff)
    middle = rows + gate * attended
    assert torch.allclose(out, middle + gate2 * ff(norm(middle) * (1 + scale) + shift))
    assert clip_to_dtype(torch.full((2,), float("inf"), dtype=torch.float16)).max() == 65504
    assert clip_to_dtype(torch.full((2,), 1e6)).max() == 1e6


def test_concepts_keep_only_their_word_pieces():
    pipe = tiny.flux_pipeline()
    assert sequence_length(pipe, None, 77) == 512 and sequence_length(pipe, 16, 77) == 16
    assert call_default(pipe, "max_sequence_length") == 512 and call_default(object(), "x") is None
    embeds = encode_with_t5(pipe.tokenizer_2, pipe.text_encoder_2, ["dog", "traffic light"], 16)
    assert [e.shape for e in embeds] == [(1, 32), (2, 32)]
    with pytest.raises(ValueError, match="no tokens left"):
        select_rows(["dog"], torch.zeros(1, 4, 32), [[]])
