"""Quantized transformers through diffusers' quantization configs that run on the CPU: optimum-quanto int8
weights (``QuantoConfig``), torchao int8 weight-only (``TorchAoConfig``) and GGUF Q8_0 (dequantized on the fly,
``GGUFQuantizationConfig``). Each backend is skipped when its package is not installed.

The concept stream runs through the quantized text-stream layers: its maps equal the mask formulation
computed by the same quantized model (concept rows appended to the prompt), to float rounding; they are
close to, but not the same as, the unquantized model's maps (the quantization error).
"""

from __future__ import annotations

import pytest
import torch

import tiny
from mechanisms import (
    as_tokens, bare_run, concept_rows, flux_oracle_maps, flux_pipe, generate, max_difference, watched_run,
)

BACKENDS = ["quanto", "torchao", "gguf"]
ORACLE_TOLERANCE = 1e-5
"""The session against the mask formulation on the same quantized model: measured 8e-8 (all three backends)."""
QUANTIZATION_TOLERANCE = 1e-2
"""Maps of the int8 (Q8_0) model against the fp32 model's: measured 0.8e-3 to 1.6e-3 on these tiny models."""


def quantized_copy(transformer, backend: str, folder):
    """``transformer`` saved to ``folder`` and loaded back quantized by ``backend`` (int8 weights, fp32 compute)."""
    from diffusers import FluxTransformer2DModel

    transformer.save_pretrained(folder)
    if backend == "gguf":
        return gguf_copy(transformer, folder)
    if backend == "quanto":
        pytest.importorskip("optimum.quanto")
        from diffusers import QuantoConfig

        config = QuantoConfig(weights_dtype="int8")
    else:
        pytest.importorskip("torchao")
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        config = TorchAoConfig(Int8WeightOnlyConfig())
    return FluxTransformer2DModel.from_pretrained(folder, quantization_config=config,
                                                  torch_dtype=torch.float32).eval()


def gguf_copy(transformer, folder):
    """A GGUF file of ``transformer`` (every matrix whose rows are multiples of 32 in Q8_0, the rest F32),
    loaded with ``from_single_file`` (diffusers' key names: no conversion)."""
    gguf = pytest.importorskip("gguf")
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    path = folder / "transformer.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for name, tensor in transformer.state_dict().items():
        array = tensor.detach().float().numpy()
        if array.ndim == 2 and array.shape[-1] % 32 == 0:
            packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return FluxTransformer2DModel.from_single_file(
        str(path), config=str(folder), torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32)).eval()


def is_quantized(linear: torch.nn.Module) -> bool:
    weight = linear.weight
    return type(weight) is not torch.nn.Parameter or weight.dtype not in (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concept_stream_runs_through_the_quantized_text_layers(backend, tmp_path):
    plain_model = tiny.flux_transformer(seed=3)
    model = quantized_copy(plain_model, backend, tmp_path)
    attn = model.transformer_blocks[0].attn
    assert all(is_quantized(layer) for layer in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out))
    inputs, embeds = tiny.flux_inputs(model, seed=4), concept_rows(model, sizes=(1, 3, 2))
    options = {"layers": [0, 3], "concept_modulation": "prompt"}
    with torch.no_grad():
        plain = model(**inputs).sample
    watched, session = bare_run(model, inputs, embeds, **options)
    assert torch.equal(plain, watched)
    oracle = flux_oracle_maps(model, inputs, embeds, [0, 3])
    assert max_difference(as_tokens(session.maps), oracle) < ORACLE_TOLERANCE
    _, unquantized = bare_run(plain_model, inputs, embeds, **options)
    quantization_error = max_difference(session.maps.tensor, unquantized.maps.tensor)
    assert 100 * ORACLE_TOLERANCE < quantization_error < QUANTIZATION_TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipeline_with_a_quantized_transformer(backend, tmp_path):
    pipe, reference = flux_pipe(), flux_pipe()
    pipe.transformer = quantized_copy(pipe.transformer, backend, tmp_path)
    plain = generate(pipe)
    watched, session = watched_run(pipe, lambda: generate(pipe))
    assert torch.equal(plain, watched)
    assert session.maps.steps == [0, 1]
    _, unquantized = watched_run(reference, lambda: generate(reference))
    assert max_difference(session.maps.tensor, unquantized.maps.tensor) < QUANTIZATION_TOLERANCE
