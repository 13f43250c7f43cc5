"""Loading pipelines and their defaults (loading.py)."""

import json

import pytest

from concept_attention.loading import ModelLoadError, apply_defaults, load_pipeline, resolve_device, resolve_dtype


def test_unloadable_models_give_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline directory"):
        load_pipeline(tmp_path)
    with pytest.raises(ModelLoadError, match="not a Hugging Face Hub id"):
        load_pipeline("no/such/thing")
    with pytest.raises(ModelLoadError, match="offline"):
        load_pipeline("nobody/no-such-model")


def test_local_directory_with_defaults(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    assert pipe.concept_attention_defaults["max_sequence_length"] == 16
    assert pipe.default_sample_size * pipe.vae_scale_factor == 32
    assert pipe.model_id == str(tiny_model_dir)


def test_defaults_file_is_optional(tmp_path):
    class Pipe:
        vae_scale_factor = 8
        default_sample_size = 128

    pipe = Pipe()
    assert apply_defaults(pipe, tmp_path) == {} and pipe.default_sample_size == 128
    (tmp_path / "concept_attention.json").write_text(json.dumps({"size": 512}))
    assert apply_defaults(pipe, tmp_path) == {"size": 512} and pipe.default_sample_size == 64


def test_devices_and_dtypes():
    import torch

    assert resolve_device("cpu").type == "cpu" and resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu:x")
