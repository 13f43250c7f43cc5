"""Lumina 2 adapter on tiny random-config models: the conformance suite (``Lumina2Case``) with a float64
re-implementation oracle (context refiner per concept, grouped-query joint attention, captions of different
lengths so each sample's image rows start elsewhere), concepts read after the pipeline's system prompt, the
pipeline's sequential CFG, explain / CLI / web app on a saved tiny pipeline, fused QKV by hand."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from concept_attention import ConceptAttention
from contract import AdapterContract
from helpers import (
    as_tokens, assert_output_unchanged, attend, complex_rope, concept_embeds, oracle_block_scores, record_maps,
    rotate_complex, word_tokenizer,
)
from helpers import one_thread  # noqa: F401  (autouse: tiny matmuls on two busy cores are ~100x faster single-threaded)

CONCEPTS = ["dog", "tree", "sky"]
SYSTEM = ("You are an assistant designed to generate superior images with the superior degree of image-text "
          "alignment based on textual prompts or user prompts. <Prompt Start> ")
WORDS = ["a", "the", "dog", "cat", "tree", "sky", "grass", "by", "on", "in", "red", "car", "traffic", "light", "of",
         "and", "<", ">", "-", ".", "Prompt", "Start", *SYSTEM.replace(".", " ").replace("-", " ").split()]


@pytest.fixture(scope="module")
def lumina_pipe():
    return lumina2_pipeline(seed=1)


# ---------------------------------------------------------------- tiny models
def gemma_tokenizer():
    """A word tokenizer that starts every text with ``<bos>`` (as Gemma's does) and pads on the right."""
    from tokenizers import processors

    tokenizer = word_tokenizer(WORDS, ["<bos>"], "<pad>", "<eos>", extra=("<bos>", "<pad>", "<eos>"))
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.convert_tokens_to_ids("<bos>"))])
    return tokenizer


def lumina2_transformer(seed=0, layers=4, contract_width=False):
    """A tiny ``Lumina2Transformer2DModel``: 4 heads sharing 2 key/value heads, one refiner layer each side.

    ``contract_width`` also records ``cap_feat_dim`` as ``joint_attention_dim`` in the config (nothing reads it but
    the shared test helper that draws random concept embeddings, which looks the width up under that name).
    """
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    model = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=layers,
                                      num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
                                      axes_dim_rope=(4, 2, 2), axes_lens=(300, 32, 32), cap_feat_dim=16).eval()
    if contract_width:
        model.register_to_config(joint_attention_dim=16)
    return model


def lumina2_pipeline(seed=0):
    """A tiny ``Lumina2Pipeline``: a 2-layer Gemma 2, a 4-level VAE (the pipeline assumes scale 8), 4 main layers."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = gemma_tokenizer()
    torch.manual_seed(seed)
    encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                       pad_token_id=tokenizer.pad_token_id)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
                        latent_channels=4, norm_num_groups=2, scaling_factor=1.5, shift_factor=0.1).eval()
    pipe = Lumina2Pipeline(transformer=lumina2_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                           text_encoder=encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a dog by a tree", **kwargs):
    options = {"height": 64, "width": 96, "num_inference_steps": 2, "max_sequence_length": 64,
               "output_type": "latent", **kwargs}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **options).images


def transformer_inputs(transformer, batch=2, height=8, width=12, text=6, seed=0):
    """Bare-call inputs; the first sample's caption is two tokens shorter (so the samples' image rows start at
    different places of the joint sequence)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[0, text - 2:] = False
    return {"hidden_states": torch.randn(batch, cfg.in_channels, height, width, generator=g),
            "timestep": torch.tensor([0.4, 0.65])[:batch],
            "encoder_hidden_states": torch.randn(batch, text, cfg.cap_feat_dim, generator=g),
            "encoder_attention_mask": mask}


# ---------------------------------------------------------------- the float64 oracle
def rope(ids, axes):
    return complex_rope(ids, axes, theta=10000.0)


def qkv(attn, rows, freqs):
    heads = attn.heads
    head_dim = attn.to_q.out_features // heads
    q, k, v = (proj(rows).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    repeat = heads // k.shape[2]
    return (rotate_complex(attn.norm_q(q), freqs), rotate_complex(attn.norm_k(k), freqs).repeat_interleave(repeat, 2),
            v.repeat_interleave(repeat, 2))


def capture_layers(transformer, inputs):
    """Each main layer's inputs (positional) and attention output before ``to_out``, from a plain run."""
    captured, handles = {}, []
    for i, layer in enumerate(transformer.layers):
        handles += [
            layer.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a)),
            layer.attn.to_out[0].register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(("o", i), a[0])),
        ]
    try:
        with torch.no_grad():
            transformer(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def joint_positions(caption, grid):
    """Position ids of one sample's ``[caption, image]``: ``(i, 0, 0)``, then ``(caption, row, col)``."""
    rows, cols = grid
    ids = torch.zeros(caption + rows * cols, 3)
    ids[:caption, 0] = torch.arange(caption)
    ids[caption:, 0] = caption
    ids[caption:, 1] = torch.arange(rows).repeat_interleave(cols)
    ids[caption:, 2] = torch.arange(cols).repeat(rows)
    return ids


def oracle_maps(transformer, inputs, embeds, layers, softmax=True, space="output"):
    """Direct float64 re-implementation: concept rows through ``caption_embedder`` and the context refiner alone
    (positions 0..n-1), then every main layer with the shared weights and modulation, attending to each sample's own
    image rows (found from its caption length); o_x recomputed (joint attention, padding masked) and checked."""
    captured = capture_layers(transformer, inputs)
    model = copy.deepcopy(transformer).double()
    axes, patch = transformer.config.axes_dim_rope, transformer.config.patch_size
    grid = tuple(side // patch for side in inputs["hidden_states"].shape[2:])
    tokens, captions = math.prod(grid), inputs["encoder_attention_mask"].sum(1).tolist()
    sizes = [e.shape[0] for e in embeds]
    concept_ids = torch.zeros(sum(sizes), 3)
    concept_ids[:, 0] = torch.tensor([p for size in sizes for p in range(size)], dtype=torch.float32)
    concept_freqs = rope(concept_ids, axes)
    per_layer = []
    with torch.no_grad():
        rows = model.time_caption_embed.caption_embedder(torch.cat(embeds).double())
        for layer in model.context_refiner:
            parts = []
            for part, freqs in zip(rows.split(sizes), concept_freqs.split(sizes)):
                q, k, v = qkv(layer.attn, layer.norm1(part)[None], freqs)
                part = part + layer.norm2(layer.attn.to_out[0](attend(q, k, v).flatten(2))[0])
                parts.append(part + layer.ffn_norm2(layer.feed_forward(layer.ffn_norm1(part))))
            rows = torch.cat(parts)
        concepts = rows.expand(len(captions), -1, -1)
        for index in range(max(layers) + 1):
            layer, (x, _, _, temb) = model.layers[index], captured[index]
            scale_msa, gate_msa, scale_mlp, gate_mlp = layer.norm1.linear(torch.nn.functional.silu(temb.double())).chunk(4, 1)
            o_x, k_x, v_x = [], [], []
            for i, caption in enumerate(captions):
                length = caption + tokens
                freqs = rope(joint_positions(caption, grid), axes)
                q, k, v = qkv(layer.attn, layer.norm1.norm(x[i:i + 1, :length].double()) * (1 + scale_msa[i]), freqs)
                o_x.append(attend(q, k, v)[0, caption:])
                k_x.append(k[0, caption:])
                v_x.append(v[0, caption:])
                expected = captured[("o", index)][i, caption:length].double()
                assert torch.allclose(o_x[-1].flatten(1), expected, atol=1e-5), (index, i)
            o_x, k_x, v_x = torch.stack(o_x), torch.stack(k_x), torch.stack(v_x)
            normed = layer.norm1.norm(concepts) * (1 + scale_msa[:, None])
            q_c, k_c, v_c = qkv(layer.attn, normed, concept_freqs)
            o_c = attend(q_c, torch.cat([k_x, k_c], 1), torch.cat([v_x, v_c], 1))
            if index in layers:
                per_layer.append(oracle_block_scores(space, None, (o_x, o_c), (v_x, v_c), k_x, q_c,
                                                             layer.attn.heads, embeds, softmax))
            concepts = concepts + gate_msa.tanh()[:, None] * layer.norm2(layer.attn.to_out[0](o_c.flatten(2)))
            ffn = layer.feed_forward(layer.ffn_norm1(concepts) * (1 + scale_mlp[:, None]))
            concepts = concepts + gate_mlp.tanh()[:, None] * layer.ffn_norm2(ffn)
    return torch.stack(per_layer).mean(0)


# ---------------------------------------------------------------- 1. conformance suite
class Lumina2Case:
    """Tiny Lumina 2 models: bare inputs on a 4 × 6 token grid with captions of two lengths; sequential CFG."""

    oracle_spaces = ("output", "value", "cross_attention")
    pipeline_grid = (4, 6)

    def make_transformer(self, seed):
        return lumina2_transformer(seed, contract_width=True)

    def make_inputs(self, transformer, seed):
        return transformer_inputs(transformer, seed=seed)

    def expected_grid(self, inputs):
        return (4, 6)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, softmax=softmax, space=space)

    def make_pipeline(self):
        return lumina2_pipeline()

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2):
        return generate(pipe, prompt, guidance_scale=4.0 if guidance else 1.0, negative_prompt=negative,
                        num_inference_steps=steps)


class TestLumina2(Lumina2Case, AdapterContract):
    """The maps come from Lumina 2's main ``layers``; its output layer is ``norm_out``; it has no
    ``fuse_qkv_projections``."""

    blocks_name = "layers"
    output_name = "norm_out"

    def test_fused_qkv_gives_the_same_maps(self):
        """No ``fuse_qkv_projections()`` here; fusing each attention by hand adds a ``to_qkv`` that
        ``Lumina2AttnProcessor2_0`` never uses: outputs and maps stay the same."""
        transformer = self.make_transformer(13)
        assert not hasattr(transformer, "fuse_qkv_projections")
        inputs = self.make_inputs(transformer, 0)
        embeds = concept_embeds(transformer)
        reference = record_maps(transformer, inputs, embeds)
        with torch.no_grad():
            plain = transformer(**inputs).sample
        for layer in transformer.layers:
            layer.attn.fuse_projections()
        assert transformer.layers[0].attn.fused_projections
        fused = assert_output_unchanged(transformer, inputs, embeds)
        with torch.no_grad():
            assert torch.equal(transformer(**inputs).sample, plain)
        assert torch.allclose(fused.maps.tensor, reference.maps.tensor, atol=1e-6)


# ---------------------------------------------------------------- 2. layout and the concept stream
def test_same_caption_lengths_and_the_refiner_per_concept():
    """Without padding (no joint mask) the image rows start after the common caption; the context refiner sees
    each concept alone: without concept self-attention, adding a concept leaves the others' maps as they were."""
    transformer = lumina2_transformer(seed=2, contract_width=True)
    inputs = transformer_inputs(transformer)
    inputs["encoder_attention_mask"][:] = True
    embeds = concept_embeds(transformer, sizes=(2, 1, 3))
    ca = assert_output_unchanged(transformer, inputs, embeds)
    assert ca.maps.tensor.shape == (2, 3, 4, 6) and ca.maps.timesteps == [pytest.approx(0.6)]  # noise level 1 - t
    options = {"softmax": False, "concept_self_attention": False, "layers": [1, 3]}
    alone = record_maps(transformer, inputs, embeds[:2], concepts=["a", "b"], **options)
    more = record_maps(transformer, inputs, embeds, concepts=["a", "b", "c"], **options)
    assert torch.allclose(more.maps.tensor[:, :2], alone.maps.tensor, atol=1e-6)
    expected = oracle_maps(transformer, inputs, embeds, [1, 3])
    assert torch.allclose(as_tokens(record_maps(transformer, inputs, embeds, layers=[1, 3]).maps).double(), expected,
                          atol=1e-5)


def test_concept_rows_follow_the_system_prompt(lumina_pipe):
    ca = ConceptAttention(lumina_pipe, ["dog", "traffic light", "sky"], max_sequence_length=64)
    assert ca.groups.sizes == (1, 2, 1)
    full, mask, *_ = lumina_pipe.encode_prompt("traffic light", do_classifier_free_guidance=False, device="cpu",
                                               max_sequence_length=64)
    start = int(mask.sum()) - 2  # "<bos>", the system prompt and "<Prompt Start>" come first
    assert [p.tolist() for p in ca.adapter._encoded_positions] == [[start], [start, start + 1], [start]]
    assert torch.equal(ca.concept_embeds[1], full[0, start:start + 2].float())


def test_pipeline_batch_of_prompts_and_the_call_order(lumina_pipe):
    prompts = ["a dog", "a cat on the grass by a tree"]  # captions of different lengths in one batch
    plain = generate(lumina_pipe, prompts, num_images_per_prompt=2, negative_prompt="a cat")
    with ConceptAttention(lumina_pipe, CONCEPTS) as ca:
        watched = generate(lumina_pipe, prompts, num_images_per_prompt=2, negative_prompt="a cat")
    assert torch.equal(plain, watched)
    assert ca.maps.tensor.shape == (4, 3, 4, 6) and ca.maps.meta["family"] == "lumina2" and ca.layers == [2, 3]
    runs = []
    for cfg, call in (("auto", 0), ("none", 0), ("none", 1)):  # cfg="none": each call counts as a step
        with ConceptAttention(lumina_pipe, CONCEPTS, cfg=cfg, timesteps=[call]) as session:
            generate(lumina_pipe, negative_prompt="a cat")
        runs.append(session.maps.tensor)
    assert torch.allclose(runs[0], runs[1], atol=1e-6) and not torch.allclose(runs[0], runs[2], atol=1e-4)


# ---------------------------------------------------------------- 3. explain, CLI, web app
def test_explain_cli_and_app(tmp_path, lumina_pipe):
    from PIL import Image

    from concept_attention import ConceptMaps, explain
    from concept_attention.app import ConceptApp
    from concept_attention.cli import main

    pipe = lumina2_pipeline(seed=4)
    pipe.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "concept_attention.json").write_text(
        json.dumps({"size": 64, "num_inference_steps": 2, "max_sequence_length": 64}))
    picture = Image.fromarray((np.random.default_rng(0).random((40, 72, 3)) * 255).astype("uint8"))
    maps = explain(lumina_pipe, picture, ["dog", "sky"], num_samples=2, max_sequence_length=64, size=(96, 64))
    assert maps.tensor.shape == (1, 2, 4, 6) and maps.meta["model_size"] == [96, 64]
    session = ConceptAttention(lumina_pipe, ["dog", "sky"], max_sequence_length=64)
    with torch.no_grad(), session:  # every layer, no early exit: the same maps
        lumina_pipe.transformer(**session.adapter.explain_inputs(_request(lumina_pipe, picture)))
    assert torch.allclose(maps.tensor, session.maps.tensor.mean(0, keepdim=True), atol=1e-6)
    picture.save(tmp_path / "photo.png")
    model = str(tmp_path / "model")
    assert main(["generate", "a dog by a tree", "--concepts", "dog,tree", "--model", model, "--out",
                 str(tmp_path / "gen"), "--device", "cpu"]) == 0
    assert ConceptMaps.load(tmp_path / "gen").tensor.shape == (1, 2, 4, 4)  # 64 × 64 at 16 px per token
    assert main(["explain", str(tmp_path / "photo.png"), "--concepts", "dog,sky", "--model", model, "--out",
                 str(tmp_path / "exp"), "--device", "cpu"]) == 0
    assert ConceptMaps.load(tmp_path / "exp").tensor.shape == (1, 2, 4, 7)  # 72 × 40 -> 115 × 64 -> 112 × 64
    app = ConceptApp(lumina_pipe)
    image, overlays, segmentation, cross, archive = app.run_generate("a dog by a tree", ["dog", "tree"], 0, 2, 96, 64)
    assert len(overlays) == 2 and len(cross) == 2 and archive.endswith(".zip")


def _request(pipe, picture):
    from concept_attention.core.contract import ExplainRequest

    pixels = pipe.image_processor.preprocess(picture, height=64, width=96)
    return ExplainRequest(pipe, pixels, "", 0.5, 2, torch.Generator().manual_seed(0), 64)
