"""The packaged embedded model loads with the plain diffusers API and gives maps."""

import torch
from diffusers import FluxPipeline

from concept_attention import ConceptAttention, generate, load_pipeline
from concept_attention.loading import EMBEDDED_MODEL_DIR


def test_flux_pipeline_from_pretrained_generates_with_maps():
    pipe = FluxPipeline.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == torch.float32
    with ConceptAttention(pipe, ["red", "blue", "grass"], max_sequence_length=32) as ca:
        image = pipe("a red circle on grass", height=64, width=64, num_inference_steps=2,
                     max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert ca.maps.tensor.shape == (1, 3, 16, 16)
    assert torch.allclose(ca.maps.tensor.sum(1), torch.ones(1, 16, 16), atol=1e-5)


def test_default_model_through_the_library():
    pipe = load_pipeline()
    assert pipe.model_id == "embedded" and pipe.default_sample_size * pipe.vae_scale_factor == 64
    maps = generate(pipe, "a blue square on wall", ["blue", "square", "wall"], steps=2)
    assert maps.image.size == (64, 64) and maps.tensor.shape == (1, 3, 16, 16)
    assert "cross_attention" in maps.others
