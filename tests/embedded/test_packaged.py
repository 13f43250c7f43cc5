"""The packaged embedded model loads with the plain diffusers API and gives maps."""

import json

import safetensors.torch
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from concept_attention import ConceptAttention, generate, load_pipeline
from concept_attention.embedded.build import DEFAULT_SIZE, MAX_SEQUENCE_LENGTH
from concept_attention.loading import EMBEDDED_MODEL_DIR

DEFAULTS = json.loads((EMBEDDED_MODEL_DIR / "concept_attention.json").read_text())
VAE_LEVELS = len(json.loads((EMBEDDED_MODEL_DIR / "vae" / "config.json").read_text())["block_out_channels"])
TOKENS = DEFAULTS["size"] // (2 ** (VAE_LEVELS - 1) * 2)  # VAE downsampling, then 2x2 latent packing


def test_package_is_the_build_of_this_repository():
    """The shipped defaults are the sizes the training code builds (128 px, T5 length 16 for v2)."""
    assert DEFAULTS["size"] == DEFAULT_SIZE and DEFAULTS["max_sequence_length"] == MAX_SEQUENCE_LENGTH
    config = json.loads((EMBEDDED_MODEL_DIR / "transformer" / "config.json").read_text())
    shipped = safetensors.torch.load_file(EMBEDDED_MODEL_DIR / "transformer" / "diffusion_pytorch_model.safetensors")
    assert set(shipped) == set(FluxTransformer2DModel.from_config(config).state_dict())  # no training heads
    assert set(DEFAULTS["layers"]) <= set(range(config["num_layers"]))
    assert (EMBEDDED_MODEL_DIR / "MODEL_CARD.md").is_file()


def test_flux_pipeline_from_pretrained_generates_with_maps():
    pipe = FluxPipeline.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == torch.float32
    size, length = DEFAULTS["size"], DEFAULTS["max_sequence_length"]
    with ConceptAttention(pipe, ["red", "blue", "grass"], max_sequence_length=length) as ca:
        image = pipe("a red circle on grass", height=size, width=size, num_inference_steps=2,
                     max_sequence_length=length, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (size, size)
    assert ca.maps.tensor.shape == (1, 3, TOKENS, TOKENS)
    assert torch.allclose(ca.maps.tensor.sum(1), torch.ones(1, TOKENS, TOKENS), atol=1e-5)


def test_default_model_through_the_library():
    pipe = load_pipeline()
    size = DEFAULTS["size"]
    assert pipe.model_id == "embedded" and pipe.default_sample_size * pipe.vae_scale_factor == size
    maps = generate(pipe, "a blue square on wall", ["blue", "square", "wall"], steps=2)
    assert maps.image.size == (size, size) and maps.tensor.shape == (1, 3, TOKENS, TOKENS)
    assert "cross_attention" in maps.others
