"""The prompt cross-attention baseline of benchmarks/scenes.py (tiny random FLUX models, CPU, fast)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import tiny
from repo_scripts import load_script



@pytest.fixture(scope="module")
def scenes():
    return load_script("benchmarks/scenes.py", "benchmark_scenes")


@pytest.fixture()
def dispatched(monkeypatch):
    """Every (query, key) the FLUX attention processor hands to its attention kernel, post-rotary."""
    from diffusers.models.transformers import transformer_flux

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = transformer_flux.dispatch_attention_fn

    def capture(query, key, value, *args, **kwargs):
        calls.append((query.detach().clone(), key.detach().clone()))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", capture)
    return calls


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def expected_maps(query: torch.Tensor, key: torch.Tensor, text_len: int) -> torch.Tensor:
    """Direct computation from the kernel's inputs: prompt rows × image columns, softmax over the image."""
    q, k = query[:, :text_len].float(), key[:, text_len:].float()
    logits = torch.einsum("bshd,bnhd->bhsn", q, k) / q.shape[-1] ** 0.5
    return logits.softmax(dim=-1).mean(dim=(0, 1))


def test_reconstruction_matches_the_processor(scenes, dispatched):
    """Queries/keys/rotary rebuilt from the hooks equal what FluxAttnProcessor feeds its kernel.

    Non-zero ``txt_ids`` make the text rotation non-trivial (FLUX.1 itself uses zeros).
    """
    from diffusers import FluxPipeline

    model = tiny.flux_transformer(seed=3, layers=3)
    batch, text_len, height, width = 2, 6, 4, 5
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(batch, height * width, 16, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text_len, 32, generator=generator),
        "pooled_projections": torch.randn(batch, 32, generator=generator),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, height, width, "cpu", torch.float32),
        "txt_ids": torch.randint(0, 7, (text_len, 3), generator=generator).float(),
        "return_dict": False,
    }
    before = hook_count(model)
    with torch.no_grad(), scenes.PromptCrossAttention(model.transformer_blocks, keep_qk=True) as recorder:
        model(**inputs)
    assert hook_count(model) == before
    dual = [call for call in dispatched if call[0].shape[1] == text_len + height * width][:3]
    assert len(dual) == 3 and sorted(recorder.maps) == [0, 1, 2]
    for index, (query, key) in enumerate(dual):
        q, k = recorder.qk[index]
        torch.testing.assert_close(q, query[:, :text_len], rtol=0, atol=0)
        torch.testing.assert_close(k, key[:, text_len:], rtol=0, atol=0)
        assert not torch.allclose(q, recorder_unrotated_query(model, index, inputs)), "text rotation was a no-op"
        torch.testing.assert_close(recorder.maps[index], expected_maps(query, key, text_len))
        torch.testing.assert_close(recorder.maps[index].sum(dim=-1), torch.ones(text_len))


def recorder_unrotated_query(model, index: int, inputs: dict) -> torch.Tensor:
    """The block's prompt queries straight from ``norm_added_q`` (before rotary), for the no-op check."""
    seen = []
    handle = model.transformer_blocks[index].attn.norm_added_q.register_forward_hook(
        lambda module, args, output: seen.append(output))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen[0]


def test_inside_explain_results_unchanged(scenes, flux_pipe, dispatched):
    """In an explain call the concept rows' ``norm_added_q`` call is not mistaken for the prompt's,
    the concept maps are unchanged, and every hook is removed."""
    from concept_attention import explain

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    kwargs = dict(prompt="a red car on grass", timestep=0.5, num_samples=2, seed=1, layers=[0, 1, 2, 3],
                  size=(32, 32), max_sequence_length=16, space=["output", "cross_attention"])
    concepts = ["red", "blue", "car", "grass"]
    plain = explain(flux_pipe, image, concepts, **kwargs)
    dispatched.clear()
    before = hook_count(flux_pipe.transformer)
    blocks = flux_pipe.transformer.transformer_blocks
    with scenes.PromptCrossAttention(blocks, keep_qk=True) as recorder:
        hooked = explain(flux_pipe, image, concepts, **kwargs)
    assert hook_count(flux_pipe.transformer) == before
    torch.testing.assert_close(hooked.tensor, plain.tensor, rtol=0, atol=0)
    torch.testing.assert_close(hooked.others["cross_attention"].tensor, plain.others["cross_attention"].tensor,
                               rtol=0, atol=0)
    tokens = 8 * 8  # 32 px / VAE factor 2 / 2×2 packing
    assert len(dispatched) == 4
    for index, (query, key) in enumerate(dispatched):
        assert recorder.maps[index].shape == (16, tokens)
        q, k = recorder.qk[index]
        torch.testing.assert_close(q, query[:, :16], rtol=0, atol=0)
        torch.testing.assert_close(k, key[:, 16:], rtol=0, atol=0)
        torch.testing.assert_close(recorder.maps[index], expected_maps(query, key, 16))


def test_hooks_removed_after_an_error(scenes, flux_pipe):
    blocks = flux_pipe.transformer.transformer_blocks
    before = hook_count(flux_pipe.transformer)
    with pytest.raises(ZeroDivisionError):
        with scenes.PromptCrossAttention(blocks):
            1 / 0
    assert hook_count(flux_pipe.transformer) == before


def test_caption_positions(scenes):
    tokenizer = tiny.t5_tokenizer()
    positions = scenes.caption_positions(tokenizer, "a red car and a red house on grass",
                                         ["red", "blue", "car", "grass"], 16)
    ids = tokenizer("a red car and a red house on grass", padding="max_length", max_length=16).input_ids
    red = tokenizer.convert_tokens_to_ids("▁red")
    assert positions[0] == [i for i, t in enumerate(ids) if t == red] and len(positions[0]) == 2
    assert positions[1] == []
    assert positions[2] == [2] and positions[3] == [8]


def test_baseline_maps(scenes):
    text_len, height, width = 5, 2, 3
    per_block = {b: torch.rand(text_len, height * width).softmax(dim=-1) for b in range(3)}
    maps = scenes.prompt_cross_attention_maps(per_block, [1, 2], [[1], [], [2, 4]], (height, width))
    expected_first = ((per_block[1][1] + per_block[2][1]) / 2).reshape(height, width)  # row-major
    torch.testing.assert_close(maps[0], expected_first / expected_first.sum())
    assert torch.count_nonzero(maps[1]) == 0
    torch.testing.assert_close(maps.flatten(1).sum(dim=1), torch.tensor([1.0, 0.0, 1.0]))


def test_a_partly_trained_models_blocks_are_scored_in_two_groups(scenes):
    bench = scenes
    import types

    grounded = types.SimpleNamespace(concept_attention_defaults={"grounded_blocks": [1, 2]})
    assert bench.trained_block_groups(grounded, [0, 1, 2, 3]) == [("trained blocks 1, 2", [1, 2]),
                                                                  ("untrained blocks 0, 3", [0, 3])]
    assert bench.trained_block_groups(types.SimpleNamespace(concept_attention_defaults={}), [0, 1, 2, 3]) == []
    whole = types.SimpleNamespace(concept_attention_defaults={"grounded_blocks": [0, 1]})
    assert bench.trained_block_groups(whole, [0, 1]) == [("trained blocks 0, 1", [0, 1])]
