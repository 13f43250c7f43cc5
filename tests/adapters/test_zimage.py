"""Z-Image adapter on tiny random-config models: the conformance suite (``ZImageCase``) with a float64
re-implementation oracle (context refiner per concept, ``[image, caption]`` sequences padded to multiples of 32,
captions of different padded lengths), concepts read through the chat template, the pipeline's guidance layout
(refused with a clear error; ``cfg="none"`` maps every row), explain / CLI / web app, fused QKV by hand.

Z-Image differs from what the shared suite assumes in several ways, so most of its checks are restated here
for this model (same promises): the latents and the output are lists of tensors, the mapped blocks are
``layers``, the output layer is ``all_final_layer``, there is no ``fuse_qkv_projections``, and the pipeline's
guidance batch puts the conditional rows first.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from concept_attention import ConceptAttention
from contract import AdapterContract
from helpers import (
    as_tokens, assert_restored, attend, complex_rope, concept_embeds, oracle_block_scores, record_maps,
    rotate_complex, snapshot, word_tokenizer,
)
from helpers import one_thread  # noqa: F401  (autouse: tiny matmuls on two busy cores are ~100x faster single-threaded)

CONCEPTS = ["dog", "tree", "sky"]
WORDS = ["a", "the", "dog", "cat", "tree", "sky", "grass", "by", "on", "in", "red", "car", "traffic", "light", "of",
         "and", "user", "assistant", "system"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def zimage_pipe():
    return zimage_pipeline(seed=1)


# ---------------------------------------------------------------- tiny models
def zimage_transformer(seed=0, layers=4, contract_width=True):
    """A tiny ``ZImageTransformer2DModel`` (width 32, 2 heads, one refiner layer each side).

    ``contract_width`` also records ``cap_feat_dim`` as ``joint_attention_dim`` in the config: nothing reads it but
    the shared test helper that draws random concept embeddings, which looks the width up under that name.
    """
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                     n_layers=layers, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                     axes_dims=[8, 4, 4], axes_lens=[128, 32, 32]).eval()
    if contract_width:
        model.register_to_config(joint_attention_dim=16)
    return model


def zimage_pipeline(seed=0):
    """A tiny ``ZImagePipeline``: a 2-layer Qwen3 with a chat template, VAE scale 2 (4 px per token), 4 layers."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = word_tokenizer(WORDS, ["<|im_start|>"], "<|endoftext|>", "<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24,
                                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                     pad_token_id=tokenizer.pad_token_id)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, scaling_factor=1.5, shift_factor=0.1).eval()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder,
                          tokenizer=tokenizer, transformer=zimage_transformer(seed, contract_width=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a dog by a tree", **kwargs):
    options = {"height": 32, "width": 48, "num_inference_steps": 2, "max_sequence_length": 32,
               "guidance_scale": 0.0, "output_type": "latent", **kwargs}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **options).images


def transformer_inputs(transformer, batch=2, height=8, width=12, seed=0, captions=(5, 37)):
    """Bare-call inputs (lists, as the pipeline passes them): one-frame latents and captions whose padded lengths
    differ (32 and 64 rows), so the joint sequences are masked."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return {"x": [torch.randn(cfg.in_channels, 1, height, width, generator=g) for _ in range(batch)],
            "t": torch.tensor([0.4, 0.65])[:batch],
            "cap_feats": [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in captions[:batch]]}


def run(transformer, inputs):
    with torch.no_grad():
        return torch.stack(transformer(**{**inputs, "return_dict": False})[0])


# ---------------------------------------------------------------- the float64 oracle
def rope(ids, axes):
    return complex_rope(ids, axes, theta=256.0)


def qkv(attn, rows, freqs):
    q, k, v = (proj(rows).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    return rotate_complex(attn.norm_q(q), freqs), rotate_complex(attn.norm_k(k), freqs), v


def padded(count):
    return count + (-count) % 32


def joint_positions(grid, caption):
    """Position ids of ``[image (padded), caption (padded)]``: image ``(caption + 1, row, col)``, image padding
    ``(0, 0, 0)``, caption row ``i`` at ``(1 + i, 0, 0)``."""
    rows, cols = grid
    image = torch.zeros(padded(rows * cols), 3, dtype=torch.long)
    image[:rows * cols, 0] = padded(caption) + 1
    image[:rows * cols, 1] = torch.arange(rows).repeat_interleave(cols)
    image[:rows * cols, 2] = torch.arange(cols).repeat(rows)
    text = torch.zeros(padded(caption), 3, dtype=torch.long)
    text[:, 0] = 1 + torch.arange(padded(caption))
    return torch.cat([image, text])


def capture_layers(transformer, inputs):
    captured, handles = {}, []
    for i, layer in enumerate(transformer.layers):
        handles += [
            layer.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a)),
            layer.attention.to_out[0].register_forward_pre_hook(
                lambda m, a, i=i: captured.__setitem__(("o", i), a[0])),
        ]
    try:
        run(transformer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def oracle_maps(transformer, inputs, embeds, layers, softmax=True, space="output"):
    """Direct float64 re-implementation: concept rows through ``cap_embedder`` and the context refiner alone (own
    positions ``1 + i``), then every main layer with the shared weights and the timestep modulation, attending to the
    image rows (padding rows included); o_x recomputed from the captured sequence (own position ids) and checked."""
    captured = capture_layers(transformer, inputs)
    model = copy.deepcopy(transformer).double()
    axes, patch = transformer.config.axes_dims, transformer.config.all_patch_size[0]
    grid = tuple(side // patch for side in inputs["x"][0].shape[2:])
    tokens, image = math.prod(grid), padded(math.prod(grid))
    sizes = [e.shape[0] for e in embeds]
    concept_ids = torch.zeros(sum(sizes), 3, dtype=torch.long)
    concept_ids[:, 0] = 1 + torch.tensor([p for size in sizes for p in range(size)])
    concept_freqs = rope(concept_ids, axes)
    per_layer = []
    with torch.no_grad():
        rows = model.cap_embedder(torch.cat(embeds).double())
        for layer in model.context_refiner:
            parts = []
            for part, freqs in zip(rows.split(sizes), concept_freqs.split(sizes)):
                q, k, v = qkv(layer.attention, layer.attention_norm1(part)[None], freqs)
                part = part + layer.attention_norm2(layer.attention.to_out[0](attend(q, k, v).flatten(2))[0])
                parts.append(part + layer.ffn_norm2(layer.feed_forward(layer.ffn_norm1(part))))
            rows = torch.cat(parts)
        concepts = rows.expand(len(inputs["x"]), -1, -1)
        for index in range(max(layers) + 1):
            layer, (x, _, _, adaln, *_) = model.layers[index], captured[index]
            scale_msa, gate_msa, scale_mlp, gate_mlp = layer.adaLN_modulation(adaln.double()).chunk(4, dim=1)
            o_x, k_x, v_x = [], [], []
            for i, caption in enumerate(inputs["cap_feats"]):
                length = image + padded(caption.shape[0])
                normed = layer.attention_norm1(x[i:i + 1, :length].double()) * (1 + scale_msa[i])
                q, k, v = qkv(layer.attention, normed, rope(joint_positions(grid, caption.shape[0]), axes))
                o_x.append(attend(q, k, v)[0, :image])
                k_x.append(k[0, :image])
                v_x.append(v[0, :image])
                assert torch.allclose(o_x[-1].flatten(1), captured[("o", index)][i, :image].double(), atol=1e-5)
            o_x, k_x, v_x = torch.stack(o_x), torch.stack(k_x), torch.stack(v_x)
            q_c, k_c, v_c = qkv(layer.attention, layer.attention_norm1(concepts) * (1 + scale_msa[:, None]),
                                concept_freqs)
            o_c = attend(q_c, torch.cat([k_x, k_c], 1), torch.cat([v_x, v_c], 1))
            if index in layers:
                per_layer.append(oracle_block_scores(space, tokens, (o_x, o_c), (v_x, v_c), k_x, q_c,
                                                             layer.attention.heads, embeds, softmax))
            attended = layer.attention_norm2(layer.attention.to_out[0](o_c.flatten(2)))
            concepts = concepts + gate_msa.tanh()[:, None] * attended
            ffn = layer.feed_forward(layer.ffn_norm1(concepts) * (1 + scale_mlp[:, None]))
            concepts = concepts + gate_mlp.tanh()[:, None] * layer.ffn_norm2(ffn)
    return torch.stack(per_layer).mean(0)


# ---------------------------------------------------------------- 1. conformance suite
class ZImageCase:
    """Tiny Z-Image models: bare inputs on a 4 × 6 token grid; the pipeline without guidance (Turbo's setting)."""

    attention = "attention"
    oracle_spaces = ("output", "value", "cross_attention")
    pipeline_grid = (8, 12)

    def make_transformer(self, seed):
        return zimage_transformer(seed)

    def make_inputs(self, transformer, seed):
        return transformer_inputs(transformer, seed=seed)

    def expected_grid(self, inputs):
        return (4, 6)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, softmax=softmax, space=space)

    def make_pipeline(self):
        return zimage_pipeline()

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2, cfg=None):
        return generate(pipe, prompt, guidance_scale=4.0 if guidance else 0.0, negative_prompt=negative,
                        num_inference_steps=steps)


class TestZImage(ZImageCase, AdapterContract):
    """The suite's promises, restated where Z-Image's pipeline differs (guided runs: module docstring)."""

    blocks_name, attention, output_name = "layers", "attention", "all_final_layer.2-1"

    def run_transformer(self, transformer, inputs):
        return run(transformer, inputs)

    def test_pipeline_with_guidance_is_bit_identical(self, pipe):
        """With guidance the run is refused at its first transformer call (and everything is put back); with
        ``cfg="none"`` it is bit-identical and every row of the ``[prompt; negative]`` batch is mapped."""
        kind, before = type(pipe), snapshot(pipe.transformer)
        with pytest.raises(ValueError, match="guidance_scale=0"):
            with ConceptAttention(pipe, self.concepts):
                self.run_pipeline(pipe, guidance=True)
        assert type(pipe) is kind and "cache_context" not in pipe.transformer.__dict__
        assert_restored(pipe.transformer, before)
        plain = self.run_pipeline(pipe, guidance=True)
        with ConceptAttention(pipe, self.concepts, cfg="none") as ca:
            watched = self.run_pipeline(pipe, guidance=True)
        assert torch.equal(plain, watched) and ca.maps.tensor.shape == (2, 3, 8, 12) and ca.steps == [0, 1]
        plain = self.run_pipeline(pipe, guidance=False)
        with ConceptAttention(pipe, self.concepts) as ca:
            watched = self.run_pipeline(pipe, guidance=False)
        assert torch.equal(plain, watched) and ca.maps.tensor.shape == (1, 3, 8, 12) and ca.steps == [0, 1]

    def test_guidance_maps_are_the_conditional_ones(self, pipe):
        """The first half of a guided batch (``cfg="none"``) holds the prompt's maps: the same as without guidance
        on the first step (same latents), whatever the negative prompt; another prompt changes them."""
        runs = []
        for guidance, negative in ((True, "a cat"), (True, "grass and sky"), (False, "a cat")):
            with ConceptAttention(pipe, self.concepts, timesteps=[0], cfg="none") as ca:
                self.run_pipeline(pipe, guidance=guidance, negative=negative)
            runs.append(ca.maps.tensor[:1])
        assert torch.allclose(runs[0], runs[1], atol=1e-5) and torch.allclose(runs[0], runs[2], atol=1e-5)
        with ConceptAttention(pipe, self.concepts, timesteps=[0]) as other:
            self.run_pipeline(pipe, guidance=False, prompt="a red car in the sky")
        assert not torch.allclose(other.maps.tensor, runs[0], atol=1e-4)

    def test_fused_qkv_gives_the_same_maps(self):
        """No ``fuse_qkv_projections()`` here; fusing each attention by hand adds a ``to_qkv`` that
        ``ZSingleStreamAttnProcessor`` never uses: outputs and maps stay the same."""
        transformer = self.make_transformer(13)
        assert not hasattr(transformer, "fuse_qkv_projections")
        inputs = self.make_inputs(transformer, 0)
        embeds = concept_embeds(transformer)
        reference = record_maps(transformer, inputs, embeds)
        plain = run(transformer, inputs)
        for layer in transformer.layers:
            layer.attention.fuse_projections()
        assert transformer.layers[0].attention.fused_projections
        with ConceptAttention(transformer, self.concepts, concept_embeds=embeds) as fused:
            assert torch.equal(run(transformer, inputs), plain)
        assert torch.allclose(fused.maps.tensor, reference.maps.tensor, atol=1e-6)


# ---------------------------------------------------------------- 2. the concept stream, refusals
def test_the_context_refiner_sees_each_concept_alone():
    transformer = zimage_transformer(seed=2)
    inputs = transformer_inputs(transformer, captions=(7, 7))  # equal lengths: no joint mask
    embeds = concept_embeds(transformer, sizes=(2, 1, 3))
    options = {"softmax": False, "concept_self_attention": False, "layers": [1, 3]}
    alone = record_maps(transformer, inputs, embeds[:2], concepts=["a", "b"], **options)
    more = record_maps(transformer, inputs, embeds, concepts=["a", "b", "c"], **options)
    assert torch.allclose(more.maps.tensor[:, :2], alone.maps.tensor, atol=1e-6)
    expected = oracle_maps(transformer, inputs, embeds, [1, 3])
    got = as_tokens(record_maps(transformer, inputs, embeds, layers=[1, 3]).maps).double()
    assert torch.allclose(got, expected, atol=1e-5)


def test_attention_backend_reaches_the_original_processor():
    transformer = zimage_transformer(seed=8)
    inputs = transformer_inputs(transformer)
    original = transformer.layers[0].attention.processor
    plain = run(transformer, inputs)
    with ConceptAttention(transformer, ["a"], concept_embeds=[torch.randn(1, 16)]):
        transformer.set_attention_backend("native")
        watched = run(transformer, inputs)
    assert torch.equal(plain, watched) and original._attention_backend.value == "native"


def test_omni_mode_is_refused():
    transformer = zimage_transformer(seed=3)
    inputs = transformer_inputs(transformer)
    omni = dict(inputs, x=[[latent] for latent in inputs["x"]], cap_feats=[[c] for c in inputs["cap_feats"]])
    before = snapshot(transformer)
    with pytest.raises(ValueError, match="omni mode"), ConceptAttention(
            transformer, ["a"], concept_embeds=[torch.zeros(1, 16)]):
        run(transformer, omni)
    assert_restored(transformer, before)


# ---------------------------------------------------------------- 3. the pipeline
def test_concept_rows_are_the_concepts_own_tokens(zimage_pipe):
    ca = ConceptAttention(zimage_pipe, ["dog", "traffic light", "sky"], max_sequence_length=32)
    assert ca.groups.sizes == (1, 2, 1)
    assert [p.tolist() for p in ca.adapter._encoded_positions] == [[3], [3, 4], [3]]  # after "<|im_start|>user\n"
    (alone,), _ = zimage_pipe.encode_prompt("traffic light", device="cpu", do_classifier_free_guidance=False,
                                            max_sequence_length=32)
    assert alone.shape[0] == 3 + 2 + 5  # template, the concept, "<|im_end|>\n<|im_start|>assistant\n"
    assert torch.equal(ca.concept_embeds[1], alone[3:5].float())


def test_pipeline_batch_of_prompts(zimage_pipe):
    prompts = ["a dog", "a cat on the grass by a tree"]  # copied per call: the pipeline templates the list in place
    plain = generate(zimage_pipe, list(prompts), num_images_per_prompt=2)
    with ConceptAttention(zimage_pipe, CONCEPTS) as ca:
        watched = generate(zimage_pipe, list(prompts), num_images_per_prompt=2)
    assert torch.equal(plain, watched)
    assert ca.maps.tensor.shape == (4, 3, 8, 12) and ca.maps.meta["family"] == "zimage" and ca.layers == [2, 3]
    assert not torch.allclose(ca.maps.tensor[0], ca.maps.tensor[-1])


def test_explain_cli_and_app(tmp_path, zimage_pipe):
    """The CLI on a saved tiny pipeline (``--size``: ``ZImagePipeline`` generates at 1024 px unless told, it has
    no ``default_sample_size`` to carry ``concept_attention.json``'s size), ``explain`` with early exit, the app."""
    from PIL import Image

    from concept_attention import ConceptMaps
    from concept_attention.app import ConceptApp
    from concept_attention.cli import main
    from concept_attention.core.contract import ExplainRequest
    from concept_attention.explanation import explain

    zimage_pipeline(seed=4).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "concept_attention.json").write_text(
        json.dumps({"size": 32, "num_inference_steps": 2, "max_sequence_length": 32, "guidance_scale": 0.0}))
    picture = Image.new("RGB", (40, 24), (30, 140, 60))
    picture.save(tmp_path / "photo.png")
    model = str(tmp_path / "model")
    assert main(["generate", "a dog by a tree", "--concepts", "dog,tree", "--model", model, "--size", "48x32", "--out",
                 str(tmp_path / "gen"), "--device", "cpu"]) == 0
    generated = ConceptMaps.load(tmp_path / "gen")
    assert generated.tensor.shape == (1, 2, 8, 12) and generated.meta["family"] == "zimage"
    assert main(["explain", str(tmp_path / "photo.png"), "--concepts", "dog,sky", "--model", model, "--out",
                 str(tmp_path / "exp"), "--device", "cpu"]) == 0
    assert ConceptMaps.load(tmp_path / "exp").tensor.shape == (1, 2, 8, 13)  # 40 × 24 -> 52 × 32 (size 32)
    maps = explain(zimage_pipe, picture, CONCEPTS, prompt="a dog", num_samples=2, size=(48, 32))
    session = ConceptAttention(zimage_pipe, CONCEPTS)
    pixels = zimage_pipe.image_processor.preprocess(picture, height=32, width=48)
    inputs = session.adapter.explain_inputs(ExplainRequest(zimage_pipe, pixels, "a dog", 0.5, 2,
                                                           torch.Generator().manual_seed(0)))
    assert inputs["t"].tolist() == [0.5, 0.5] and len(inputs["x"]) == 2 and inputs["x"][0].shape == (4, 1, 16, 24)
    with session:
        run(zimage_pipe.transformer, inputs)  # every layer: the early exit changes nothing
    assert maps.tensor.shape == (1, 3, 8, 12)
    assert torch.allclose(maps.tensor, session.maps.tensor.mean(0, keepdim=True), atol=1e-6)
    from concept_attention.app import UserInputError

    app = ConceptApp(zimage_pipe)
    with pytest.raises(UserInputError, match="guidance_scale=0"):  # the pipeline's default guidance: refused, clearly
        app.run_generate("a dog by a tree", ["dog", "tree"], 0, 2, 48, 32)
    zimage_pipe.concept_attention_defaults = {"guidance_scale": 0.0}  # what a Turbo model's concept_attention.json says
    try:
        image, overlays, segmentation, cross, archive = app.run_generate("a dog by a tree", ["dog", "tree"], 0, 2, 48,
                                                                         32)
    finally:
        del zimage_pipe.concept_attention_defaults
    assert len(overlays) == 2 and len(cross) == 2 and archive.endswith(".zip")
