"""Diffusers' caching accelerators: First Block Cache, TaylorSeer (full and lite), Pyramid Attention Broadcast,
MagCache, FasterCache (FLUX.1; and CogVideoX, whose batched CFG FasterCache cuts to the conditional half).

On a step where a cache skips a block or reuses an attention output, the concept stream did not run
through that block: the session records only the steps that were computed through every concept block,
lists the others in ``maps.meta["skipped_steps"]`` and warns. The recorded maps equal those of an
uncached transformer replaying the very calls of the cached run; the image is bit-identical.
(SeaCache needs pipelines that pass ``step_index``/``sigma`` to ``cache_context``, none of the tiny ones.)
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from mechanisms import CONCEPTS, flux_pipe, generate, max_difference, recorded_calls, replayed_maps

STEPS = 6
REPLAY_TOLERANCE = 1e-6
"""Recorded maps against the uncached replay of the same calls: measured 0 (FLUX.1), 6e-8 (CogVideoX, whose
replay computes the conditional rows beside the unconditional ones that FasterCache had dropped)."""


def flux_caches(pipe) -> dict:
    from diffusers import (
        FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    timestep = lambda: pipe.current_timestep  # noqa: E731
    return {
        "first_block_cache": FirstBlockCacheConfig(threshold=0.5),
        "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2,
                                            taylor_factors_dtype=torch.float32),
        "taylorseer_lite": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, use_lite_mode=True,
                                                 taylor_factors_dtype=torch.float32),
        "pyramid_attention_broadcast": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=3, spatial_attention_timestep_skip_range=(-1, 10_000),
            current_timestep_callback=timestep),  # counts conditional and unconditional calls: 3 to skip both
        "mag_cache": MagCacheConfig(threshold=1.0, max_skip_steps=2, num_inference_steps=STEPS,
                                    mag_ratios=[1.0] + [0.9] * (STEPS - 1)),
        "faster_cache": FasterCacheConfig(  # guidance-distilled: attention approximated, no batch cut
            spatial_attention_block_skip_range=3, spatial_attention_timestep_skip_range=(-1, 999),
            current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True),
    }


@contextlib.contextmanager
def cache_on(transformer, config):
    """The cache enabled with fresh state (and disabled again)."""
    transformer.enable_cache(config)
    try:
        yield
    finally:
        transformer.disable_cache()


@contextlib.contextmanager
def attention_runs(attentions):
    """Per transformer call (a set added by ``begin``): which of ``attentions`` computed their output."""
    runs: list[set[int]] = []
    handles = [attn.to_out[0].register_forward_hook(lambda m, a, o, i=index: runs[-1].add(i))
               for index, attn in enumerate(attentions)]
    try:
        yield runs
    finally:
        for handle in handles:
            handle.remove()


def cached_session_run(pipe, config, run, attentions):
    """``run()`` with the cache on, inside a session; returns (output, session, warnings, the calls with the number of
    concept-block attentions each computed)."""
    from concept_attention import ConceptAttention

    transformer = pipe.transformer
    with cache_on(transformer, config), recorded_calls(transformer) as calls, attention_runs(attentions) as counts:
        handle = transformer.register_forward_pre_hook(lambda m, a: counts.append(set()))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with ConceptAttention(pipe, CONCEPTS) as session:
                output = run()
        handle.remove()
    return output, session, [str(w.message) for w in caught], [(call, len(ran)) for call, ran in zip(calls, counts)]


def check_recorded_steps(session, messages, calls, blocks, conditional):
    """Steps are recorded iff every concept block computed its attention in the conditional call; the others are
    listed as skipped."""
    mapped = [(call, count) for call, count in calls if conditional(call)]
    computed = [step for step, (_, count) in enumerate(mapped) if count == blocks]
    skipped = [step for step in range(len(mapped)) if step not in computed]
    maps = session.maps
    assert maps.steps == computed and maps.meta["skipped_steps"] == skipped
    assert computed and skipped  # the cache really skipped something here, and not everything
    assert sum("maps.meta['skipped_steps']" in m for m in messages) == 1
    return [call for (call, _), step in zip(mapped, range(len(mapped))) if step in computed]


@pytest.fixture(scope="module")
def pipe():
    return flux_pipe()


@pytest.mark.parametrize("name", ["first_block_cache", "taylorseer", "taylorseer_lite", "pyramid_attention_broadcast",
                                  "mag_cache", "faster_cache"])
def test_flux_records_only_computed_steps(pipe, name):
    config = flux_caches(pipe)[name]
    with cache_on(pipe.transformer, config):
        plain = generate(pipe, steps=STEPS)
    wrapped = pipe.transformer.transformer_blocks[:4]  # the concept stream runs through blocks 0..3 (maps: 2, 3)
    watched, session, messages, calls = cached_session_run(
        pipe, config, lambda: generate(pipe, steps=STEPS), [block.attn for block in wrapped])
    assert torch.equal(plain, watched)
    computed = check_recorded_steps(session, messages, calls, len(wrapped), lambda call: call[0] != "uncond")
    replay = replayed_maps(pipe.transformer, pipe, computed)
    assert max_difference(session.maps.tensor, replay.tensor) <= REPLAY_TOLERANCE
    assert replay.steps == list(range(len(computed))) and not replay.meta["skipped_steps"]


def test_cogvideox_faster_cache_cuts_the_unconditional_half():
    """Batched CFG: on most steps FasterCache runs only the conditional rows; those steps still map (and the steps
    whose attention it approximated are skipped)."""
    from diffusers import FasterCacheConfig

    import tiny_video_flux2 as tv

    pipe = tv.cogvideox_pipeline(rope=True)
    pipe.set_progress_bar_config(disable=True)
    config = FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 10_000),
        current_timestep_callback=lambda: pipe._current_timestep, unconditional_batch_skip_range=3,
        unconditional_batch_timestep_skip_range=(-1, 10_000), attention_weight_callback=lambda _: 0.5,
        tensor_format="BFCHW")

    def run():
        return tv.cogvideox_generate(pipe, guidance_scale=6.0, num_inference_steps=STEPS)

    with cache_on(pipe.transformer, config):
        plain = run()
    blocks = pipe.transformer.transformer_blocks[:4]
    rows = []
    handle = blocks[0].attn1.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]),
                                                       with_kwargs=True)
    watched, session, messages, calls = cached_session_run(pipe, config, run, [block.attn1 for block in blocks])
    handle.remove()
    assert torch.equal(plain, watched)
    computed = check_recorded_steps(session, messages, calls, len(blocks), lambda call: True)
    assert 1 in rows and 2 in rows  # some calls ran the conditional row alone
    replay = replayed_maps(pipe.transformer, pipe, computed, cfg="batched")
    assert max_difference(session.maps.tensor, replay.tensor) <= REPLAY_TOLERANCE
