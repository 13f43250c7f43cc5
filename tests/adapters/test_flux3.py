"""FLUX.3 adapter on tiny random-config models: the conformance suite (``Flux3Case``) with a float64
re-implementation oracle (text-mode blocks per concept, joint blocks with the text modulation, RoPE tables
computed from the position ids), reference tokens and flow-map checkpoints, concepts read through the modular
pipeline's chat template, the guider's sequential CFG, real-image inputs with early exit.

Not covered here: the CLI and the web app (they load and call ``DiffusionPipeline`` pipelines; FLUX.3 ships
only as a ``ModularPipeline``) and ``explain()`` itself (the modular pipeline's image processor returns the
picture with crop information, not a tensor); the adapter's real-image inputs are run through
``run_to_last_layer``, the early-exit runner ``explain()`` uses.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from concept_attention import ConceptAttention
from contract import AdapterContract
from helpers import (
    assert_matches_oracle_maps, assert_output_unchanged, attend, concept_embeds, oracle_block_scores, record_maps,
    word_tokenizer,
)
from helpers import one_thread  # noqa: F401  (autouse: tiny matmuls on two busy cores are ~100x faster single-threaded)

CONCEPTS = ["dog", "tree", "sky"]
WORDS = ["a", "the", "dog", "cat", "tree", "sky", "grass", "by", "on", "in", "red", "car", "traffic", "light", "of",
         "and", "user", "assistant", "system"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def flux3_pipe():
    pipe = flux3_pipeline(seed=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- tiny models
class TextProcessor:
    """What ``Flux3TextEncoderStep`` uses of the Qwen3-VL processor: the chat template and the tokenizer (the real
    processor's video part needs torchvision)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)


def qwen3_vl_encoder(tokenizer, seed=0):
    """A tiny Qwen3-VL: 32 text layers of width 16 (the pipeline stacks layers 4, 8, ..., 32: 128 channels)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=32,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1, deepstack_visual_indexes=[0], num_position_embeddings=16)
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision)).eval()


def flux3_transformer(seed=0, single=4, flow_map=False):
    from diffusers import Flux3Transformer2DModel

    torch.manual_seed(seed)
    return Flux3Transformer2DModel(in_channels=16, cond_in_channels=16, num_layers=2, num_single_layers=single,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=128,
                                   timestep_channels=32, axes_dims_rope=(4, 4, 4, 4), flow_map=flow_map).eval()


def flux3_pipeline(seed=0, distilled=False):
    """A tiny FLUX.3 modular pipeline (no prompt upsampler): VAE scale 2, so 4 px per token; 4 joint blocks."""
    from diffusers import AutoencoderKLFlux2, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler
    from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3DistilledAutoBlocks

    tokenizer = word_tokenizer(WORDS, ["<|im_start|>"], "<|endoftext|>", "<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4).eval()
    blocks = Flux3DistilledAutoBlocks() if distilled else Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler", None)
    pipe = blocks.init_pipeline()
    components = {"transformer": flux3_transformer(seed, flow_map=distilled), "vae": vae,
                  "text_encoder": qwen3_vl_encoder(tokenizer, seed), "tokenizer": TextProcessor(tokenizer),
                  "scheduler": FlowMatchEulerDiscreteScheduler()}
    if not distilled:
        components["guider"] = ClassifierFreeGuidance(guidance_scale=3.0)
    pipe.update_components(**components)
    return pipe


def generate(pipe, prompt="a dog by a tree", **kwargs):
    options = {"height": 32, "width": 48, "num_inference_steps": 2, "output": "latents", **kwargs}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **options)


def transformer_inputs(transformer, batch=2, height=4, width=6, text=5, seed=0, references=0):
    """Bare-call inputs on a ``height × width`` grid (position ids as the pipeline makes them), then ``references``
    reference tokens on a 2-row grid; flow-map models get a target timestep."""
    from diffusers.modular_pipelines.flux3.before_denoise import _prepare_image_ids

    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    text_ids = torch.zeros(text, 4)
    text_ids[:, 3] = torch.arange(text)
    inputs = {"hidden_states": torch.randn(batch, height * width, cfg.in_channels, generator=g),
              "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim, generator=g),
              "timestep": torch.tensor([0.6, 0.35])[:batch], "img_ids": _prepare_image_ids(height, width, 0.5),
              "txt_ids": text_ids}
    if references:
        inputs["image_cond_hidden_states"] = torch.randn(batch, references, cfg.cond_in_channels, generator=g)
        inputs["image_cond_ids"] = _prepare_image_ids(2, references // 2, 0.5, l_coord=-1)
    if cfg.flow_map:
        inputs["target_timestep"] = torch.tensor([0.3, 0.1])[:batch]
    return inputs


# ---------------------------------------------------------------- the float64 oracle
def rope_table(ids, axes, theta=10000.0):
    """FLUX's real RoPE ``(cos, sin)``, (S, sum(axes)) float64, computed from position ids (S, len(axes))."""
    cos, sin = [], []
    for axis, dim in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = ids[:, axis].double()[:, None] * freqs[None]
        cos.append(angles.cos().repeat_interleave(2, dim=-1))
        sin.append(angles.sin().repeat_interleave(2, dim=-1))
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def rotate(rows, table):
    """``rows`` (B, S, H, D) rotated pairwise: ``(a, b) -> (a·cos - b·sin, b·cos + a·sin)``."""
    cos, sin = table
    pairs = rows.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return rows * cos[None, :, None] + turned * sin[None, :, None]


def modulate(rows, modulation):
    """(1 + scale)·LayerNorm(rows) + shift, and the gate."""
    shift, scale, gate = modulation.chunk(3, dim=-1)
    return (1 + scale) * F.layer_norm(rows, rows.shape[-1:], eps=1e-6) + shift, gate


def projections(attn, rows, table):
    q, k, v = (proj(rows).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    return rotate(attn.norm_q(q), table), rotate(attn.norm_k(k), table), v


def capture_blocks(transformer, inputs):
    """Each joint block's keyword inputs and attention output (before ``to_out``), each text-mode block's modulation."""
    captured, handles = {}, []
    for i, block in enumerate(transformer.single_transformer_blocks):
        handles += [
            block.register_forward_pre_hook(lambda m, a, kw, i=i: captured.__setitem__(i, kw), with_kwargs=True),
            block.attn.to_out[0].register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(("o", i), a[0])),
        ]
    for i, block in enumerate(transformer.txt_mode_blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(("txt", i), a[1])))
    try:
        with torch.no_grad():
            transformer(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def oracle_maps(transformer, inputs, embeds, layers, softmax=True, space="output"):
    """Direct float64 re-implementation: concept rows through ``context_embedder`` and each text-mode block alone
    (own positions 0..n-1 on the ``l`` axis), then the joint blocks with the shared weights and the text modulation,
    attending to ``[image (and reference) keys; concept keys]``; o_x recomputed from the block inputs and checked."""
    captured = capture_blocks(transformer, inputs)
    model = copy.deepcopy(transformer).double()
    batch, tokens = inputs["hidden_states"].shape[:2]
    text, sizes = inputs["txt_ids"].shape[0], [e.shape[0] for e in embeds]
    axes = transformer.config.axes_dims_rope
    concept_ids = torch.zeros(sum(sizes), 4)
    concept_ids[:, 3] = torch.tensor([p for size in sizes for p in range(size)], dtype=torch.float32)
    concept_table = rope_table(concept_ids, axes)
    ids = [inputs["txt_ids"], inputs["img_ids"]] + ([inputs["image_cond_ids"]] if "image_cond_ids" in inputs else [])
    joint_table = rope_table(torch.cat(ids), axes)
    per_layer = []
    with torch.no_grad():
        concepts = model.context_embedder(torch.cat(embeds).double()).expand(batch, -1, -1)
        for index, block in enumerate(model.txt_mode_blocks):
            modulation = captured[("txt", index)].double()[:, :1]
            parts = []
            for rows, cos, sin in zip(concepts.split(sizes, 1), *(t.split(sizes) for t in concept_table)):
                normed, gate = modulate(rows, modulation)
                q, k, v = projections(block.attn, normed, (cos, sin))
                parts.append(rows + gate * (block.attn.to_out[0](attend(q, k, v).flatten(2)) + block.ff(normed)))
            concepts = torch.cat(parts, dim=1)
        for index in range(max(layers) + 1):
            block, kw = model.single_transformer_blocks[index], captured[index]
            normed_x, _ = modulate(kw["hidden_states"].double(), kw["temb_mod"].double())
            normed_t, _ = modulate(kw["encoder_hidden_states"].double(), kw["temb_mod_context"].double())
            q, k, v = projections(block.attn, torch.cat([normed_t, normed_x], 1), joint_table)
            o_x = attend(q, k, v)[:, text:]
            assert torch.allclose(o_x.flatten(2), captured[("o", index)][:, text:].double(), atol=1e-5), index
            normed_c, gate = modulate(concepts, kw["temb_mod_context"].double()[:, :1])
            q_c, k_c, v_c = projections(block.attn, normed_c, concept_table)
            k_x, v_x = k[:, text:], v[:, text:]
            o_c = attend(q_c, torch.cat([k_x, k_c], 1), torch.cat([v_x, v_c], 1))
            if index in layers:
                per_layer.append(oracle_block_scores(space, tokens, (o_x, o_c), (v_x, v_c), k_x, q_c,
                                                             block.attn.heads, embeds, softmax))
            concepts = concepts + gate * (block.attn.to_out[0](o_c.flatten(2)) + block.ff(normed_c))
    return torch.stack(per_layer).mean(0)


def assert_oracle(transformer, inputs, embeds, layers, spaces=("output", "value", "cross_attention")):
    return assert_matches_oracle_maps(oracle_maps, transformer, inputs, embeds, layers, spaces)


# ---------------------------------------------------------------- 1. conformance suite
class Flux3Case:
    """Tiny FLUX.3 models: bare inputs on a 4 × 6 token grid; the guider's sequential CFG in the modular pipeline."""

    oracle_spaces = ("output", "value", "cross_attention")
    pipeline_grid = (8, 12)

    def make_transformer(self, seed):
        return flux3_transformer(seed)

    def make_inputs(self, transformer, seed):
        return transformer_inputs(transformer, seed=seed)

    def expected_grid(self, inputs):
        return (4, 6)

    def oracle(self, transformer, inputs, embeds, layers, softmax, space):
        return oracle_maps(transformer, inputs, embeds, layers, softmax=softmax, space=space)

    def make_pipeline(self):
        return flux3_pipeline()

    def run_pipeline(self, pipe, guidance, negative="a cat", prompt="a dog by a tree", steps=2):
        pipe.guider.guidance_scale = 3.0 if guidance else 1.0
        return generate(pipe, prompt, negative_prompt=negative, num_inference_steps=steps)


class TestFlux3(Flux3Case, AdapterContract):
    """The maps come from ``single_transformer_blocks`` (FLUX.3 has no ``transformer_blocks``)."""

    blocks_name = "single_transformer_blocks"


# ---------------------------------------------------------------- 2. reference tokens, flow maps, the stream itself
@pytest.mark.parametrize("flow_map", [False, True])
def test_reference_tokens_are_attended_but_not_mapped(flow_map):
    transformer = flux3_transformer(seed=2, flow_map=flow_map)
    inputs = transformer_inputs(transformer, references=8)
    embeds = concept_embeds(transformer, sizes=(1, 3, 2))
    ca = assert_output_unchanged(transformer, inputs, embeds)
    assert ca.maps.tensor.shape == (2, 3, 4, 6) and ca.maps.timesteps == [pytest.approx(0.6)]
    assert_oracle(transformer, inputs, embeds, [1, 3])
    bare = {k: v for k, v in inputs.items() if not k.startswith("image_cond")}
    without = record_maps(transformer, bare, embeds)
    assert not torch.allclose(without.maps.tensor, ca.maps.tensor, atol=1e-4)  # the reference tokens matter


def test_each_concept_passes_the_text_mode_blocks_alone():
    """Concepts meet each other only in the joint attention: with concept self-attention off, adding a concept
    leaves the other concepts' (unnormalised) maps as they were."""
    transformer = flux3_transformer(seed=7)
    inputs = transformer_inputs(transformer)
    embeds = concept_embeds(transformer, sizes=(2, 1, 3))
    options = {"softmax": False, "concept_self_attention": False}
    alone = record_maps(transformer, inputs, embeds[:2], concepts=["a", "b"], **options)
    more = record_maps(transformer, inputs, embeds, concepts=["a", "b", "c"], **options)
    assert torch.allclose(more.maps.tensor[:, :2], alone.maps.tensor, atol=1e-6)


def test_attention_backend_reaches_the_original_processor():
    """``set_attention_backend`` inside a session configures the original processors (the wrapper passes the joint
    attention's call on without a text argument, and its attributes through)."""
    transformer = flux3_transformer(seed=8)
    inputs = transformer_inputs(transformer)
    original = transformer.single_transformer_blocks[0].attn.processor
    with torch.no_grad():
        plain = transformer(**inputs).sample
        with ConceptAttention(transformer, ["a"], concept_embeds=[torch.randn(1, 128)]):
            transformer.set_attention_backend("native")
            watched = transformer(**inputs).sample
    assert torch.equal(plain, watched) and original._attention_backend.value == "native"


# ---------------------------------------------------------------- 3. the modular pipeline
def test_concept_rows_are_the_concepts_own_tokens(flux3_pipe):
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

    ca = ConceptAttention(flux3_pipe, ["dog", "traffic light", "sky"])
    assert ca.groups.sizes == (1, 2, 1)
    assert [p.tolist() for p in ca.adapter._encoded_positions] == [[3], [3, 4], [3]]  # after "<|im_start|>user\n"
    alone = Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(flux3_pipe.text_encoder, flux3_pipe.tokenizer,
                                                            "traffic light", device="cpu")
    assert alone.shape[1] == 80  # right-padded to the step's pad multiple
    assert torch.equal(ca.concept_embeds[1], alone[0, 3:5].float())


def test_pipeline_batch_and_the_guiders_order(flux3_pipe):
    plain = generate(flux3_pipe, num_images_per_prompt=2, negative_prompt="a cat")
    with ConceptAttention(flux3_pipe, CONCEPTS) as ca:
        watched = generate(flux3_pipe, num_images_per_prompt=2, negative_prompt="a cat")
    assert torch.equal(plain, watched)
    assert ca.maps.tensor.shape == (2, 3, 8, 12) and ca.maps.meta["family"] == "flux3" and ca.layers == [2, 3]
    assert ca.steps == [0, 1] and not torch.allclose(ca.maps.tensor[0], ca.maps.tensor[1], atol=1e-4)  # own noise
    runs = []
    for cfg, call in (("auto", 0), ("none", 0), ("none", 1)):  # cfg="none": each guider call counts as a step
        with ConceptAttention(flux3_pipe, CONCEPTS, cfg=cfg, timesteps=[call]) as session:
            generate(flux3_pipe, negative_prompt="a cat")
        runs.append(session.maps.tensor)
    assert torch.allclose(runs[0], runs[1], atol=1e-6)  # the first call of a step is the prompt's ...
    assert not torch.allclose(runs[0], runs[2], atol=1e-4)  # ... the second the negative prompt's


def test_distilled_pipeline_maps_every_step():
    pipe = flux3_pipeline(seed=2, distilled=True)
    pipe.set_progress_bar_config(disable=True)
    plain = generate(pipe)
    with ConceptAttention(pipe, CONCEPTS) as ca:
        watched = generate(pipe)
    assert torch.equal(plain, watched) and ca.steps == [0, 1] and ca.maps.tensor.shape == (1, 3, 8, 12)


def test_real_image_inputs_with_early_exit(flux3_pipe):
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from concept_attention.core.contract import ExplainRequest
    from concept_attention.explanation import run_to_last_layer

    picture = Image.new("RGB", (48, 32), (30, 140, 60))
    pixels = VaeImageProcessor(vae_scale_factor=4).preprocess(picture, height=32, width=48)
    session = ConceptAttention(flux3_pipe, CONCEPTS, layers=[1, 2])
    assert session.adapter.image_size_rule(flux3_pipe) == (256, 4)
    request = ExplainRequest(flux3_pipe, pixels, "a dog", 0.5, 2, torch.Generator().manual_seed(0))
    inputs = session.adapter.explain_inputs(request)
    assert inputs["hidden_states"].shape == (2, 96, 16) and inputs["timestep"].tolist() == [0.5, 0.5]
    assert inputs["img_ids"][:, 1:3].max(0).values.tolist() == [3.5, 5.5]  # the pipeline's half-scaled grid
    maps = run_to_last_layer(session, [inputs])  # stops after joint block 2
    full = ConceptAttention(flux3_pipe, CONCEPTS, layers=[1, 2])
    with torch.no_grad(), full:
        flux3_pipe.transformer(**inputs)
    assert maps.tensor.shape == (1, 3, 8, 12)
    assert torch.allclose(maps.tensor, full.maps.tensor.mean(0, keepdim=True), atol=1e-6)
