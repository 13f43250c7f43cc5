"""generate() (generation.py): the pipeline call it builds and what it returns."""

import pytest
import torch

from concept_attention.generation import generate, pipeline_call


def test_call_uses_model_defaults_under_user_choices(flux_pipe):
    flux_pipe.concept_attention_defaults = {"num_inference_steps": 3, "max_sequence_length": 16,
                                            "true_cfg_scale": 2.0, "negative_prompt": "", "unknown": 1}
    try:
        call = pipeline_call(flux_pipe, None, (48, 32), None)
        assert call == {"num_inference_steps": 3, "width": 48, "height": 32, "max_sequence_length": 16,
                        "true_cfg_scale": 2.0, "negative_prompt": ""}
        assert pipeline_call(flux_pipe, 5, None, None)["num_inference_steps"] == 5
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            pipeline_call(flux_pipe, 0, None, None)
        with pytest.raises(ValueError, match="multiples of 4"):
            pipeline_call(flux_pipe, None, (42, 32), None)
    finally:
        flux_pipe.concept_attention_defaults = {}


def test_generate_reports_progress_and_keeps_the_baseline(flux_pipe):
    steps = []
    maps = generate(flux_pipe, "a dog by a tree", ["dog", "tree"], steps=2, size=(32, 48),
                    on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 2), (2, 2)]
    assert maps.image.size == (32, 48) and maps.tensor.shape == (1, 2, 12, 8)
    assert maps.meta["num_inference_steps"] == 2 and "cross_attention" in maps.others
    assert torch.allclose(maps.tensor.sum(1), torch.ones(1, 12, 8), atol=1e-5)
    with pytest.raises(TypeError, match="prompt must be a string"):
        generate(flux_pipe, None, ["dog"])
