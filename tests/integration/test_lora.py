"""LoRA (peft, through ``load_lora_weights`` from a local file): unfused, fused, several adapters with weights.

The concept stream runs through the text-stream layers of each block, LoRA layers included: the maps
of a LoRA'd model equal those of a plain model whose weights are the merged LoRA weights (the only
difference is the rounding of ``W x + B A x`` against ``(W + B A) x``). A LoRA that only touches
layers after the mapped blocks changes the image but not the maps.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from mechanisms import flux_pipe, generate, max_difference, watched_run  # noqa: E402

TEXT_STREAM = (r"transformer_blocks\.\d+\.(attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)"
               r"|ff_context\.net\.(0\.proj|2)|norm1_context\.linear)")
IMAGE_STREAM = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
AFTER_THE_MAPS = r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"
MAP_TOLERANCE = 1e-4
"""Merged against unmerged LoRA weights in fp32 (two steps with true CFG): measured up to 2e-5 apart."""


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """Three LoRA files (random, non-zero A and B) for the tiny FLUX.1 transformer, in diffusers' format."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = flux_pipe().transformer
    folder = tmp_path_factory.mktemp("loras")
    paths = {}
    for seed, (name, targets) in enumerate({"text": TEXT_STREAM, "image": IMAGE_STREAM,
                                            "after": AFTER_THE_MAPS}.items()):
        torch.manual_seed(seed)
        transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False),
                                adapter_name=name)
        state = get_peft_model_state_dict(transformer, adapter_name=name)
        transformer.delete_adapters(name)
        state = {key: value * 4 for key, value in state.items()}  # a LoRA that clearly changes the model
        FluxPipeline.save_lora_weights(folder / name, transformer_lora_layers=state)
        paths[name] = folder / name / "pytorch_lora_weights.safetensors"
    return paths


def pipe_with(lora_files, *names, weights=None, fused=False, merged=False):
    """A fresh tiny pipeline with LoRAs ``names`` loaded (``weights`` via ``set_adapters``); ``fused``:
    ``fuse_lora()``; ``merged``: fused and unloaded, i.e. a plain model with the merged weights."""
    pipe = flux_pipe()
    for name in names:
        pipe.load_lora_weights(str(lora_files[name]), adapter_name=name)
    if weights is not None or len(names) > 1:
        pipe.set_adapters(list(names), weights)  # loading makes only the last one active
    if fused or merged:
        pipe.fuse_lora()
    if merged:
        pipe.unload_lora_weights()
    return pipe


def check_bit_identical_and_maps(pipe, reference_pipe, **options):
    """The LoRA'd pipeline's image is bit-identical with the session; its maps equal the reference's."""
    plain = generate(pipe)
    watched, session = watched_run(pipe, lambda: generate(pipe), **options)
    assert torch.equal(plain, watched)
    _, reference = watched_run(reference_pipe, lambda: generate(reference_pipe), **options)
    assert max_difference(session.maps.tensor, reference.maps.tensor) < MAP_TOLERANCE
    assert session.maps.steps == options.get("timesteps", [0, 1])
    return session


def test_unfused_lora_on_the_text_stream_is_followed(lora_files):
    pipe = pipe_with(lora_files, "text")
    assert type(pipe.transformer.transformer_blocks[0].attn.add_q_proj).__name__ == "Linear"  # peft's lora.Linear
    assert hasattr(pipe.transformer.transformer_blocks[0].attn.add_q_proj, "lora_A")
    session = check_bit_identical_and_maps(pipe, pipe_with(lora_files, "text", merged=True))
    base = flux_pipe()
    _, without = watched_run(base, lambda: generate(base))
    assert max_difference(session.maps.tensor, without.maps.tensor) > 1e-3  # the LoRA changes the maps


def test_fused_and_unfused_lora_give_the_same_maps(lora_files):
    fused = pipe_with(lora_files, "text", "image", fused=True)
    assert fused.transformer.transformer_blocks[1].attn.add_q_proj.active_adapters == ["text", "image"]
    check_bit_identical_and_maps(fused, pipe_with(lora_files, "text", "image", merged=True))
    fused.unfuse_lora()
    check_bit_identical_and_maps(fused, pipe_with(lora_files, "text", "image", merged=True))


def test_adapter_weights_are_followed(lora_files):
    pipe = pipe_with(lora_files, "text", "image", weights=[0.5, 1.5])
    weighted = check_bit_identical_and_maps(pipe, pipe_with(lora_files, "text", "image", weights=[0.5, 1.5],
                                                            merged=True))
    pipe.set_adapters(["text", "image"], [1.0, 1.0])
    _, full = watched_run(pipe, lambda: generate(pipe))
    assert max_difference(weighted.maps.tensor, full.maps.tensor) > 1e-3
    pipe.disable_lora()
    _, disabled = watched_run(pipe, lambda: generate(pipe))
    base = flux_pipe()
    _, without = watched_run(base, lambda: generate(base))
    assert torch.equal(disabled.maps.tensor, without.maps.tensor)


def test_lora_after_the_mapped_blocks_leaves_the_maps_alone(lora_files):
    pipe, base = pipe_with(lora_files, "after"), flux_pipe()
    assert not torch.equal(generate(pipe), generate(base))  # the LoRA changes the image ...
    session = check_bit_identical_and_maps(pipe, pipe_with(lora_files, "after", merged=True), timesteps=[0])
    _, without = watched_run(base, lambda: generate(base), timesteps=[0])
    assert torch.equal(session.maps.tensor, without.maps.tensor)  # ... but not what the dual blocks compute
