"""Helpers shared by the adapter tests: concept embeddings, bare-model sessions, the mask-formulation
oracle (concept rows appended to the prompt and isolated by an attention mask), restore checks."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from concept_attention import ConceptAttention

NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on two busy cores are ~100x faster single-threaded (import into a test module to use)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- inputs and sessions
def concept_embeds(transformer, sizes=(1, 2, 1), seed=1):
    """One random ``(tokens, width)`` tensor per concept, in the transformer's prompt-embedding space."""
    from concept_attention.adapters import resolve_adapter

    width = resolve_adapter(transformer).concept_embed_dim
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, width, generator=g) for n in sizes]


def record_maps(transformer, inputs, embeds, concepts=NAMES, **options):
    """A finished session over one call of a bare transformer (no gradients)."""
    with torch.no_grad(), ConceptAttention(transformer, list(concepts), concept_embeds=embeds, **options) as ca:
        transformer(**inputs)
    return ca


def assert_output_unchanged(transformer, inputs, embeds=None, **options):
    """A bare call gives the very same output inside a session as without one; returns the session."""
    embeds = concept_embeds(transformer) if embeds is None else embeds
    with torch.no_grad():
        plain = transformer(**inputs).sample
        with ConceptAttention(transformer, NAMES, concept_embeds=embeds, **options) as ca:
            watched = transformer(**inputs).sample
    assert torch.equal(plain, watched)
    return ca


def fused_qkv_runs(transformer, inputs, embeds, fuse_inside=False, calls=1):
    """Maps before and after ``fuse_qkv_projections()`` (fused before the session or inside it).

    Returns ``(reference session, fused session, outputs of the fused session's calls, plain output
    of the fused model afterwards)``.
    """
    reference = record_maps(transformer, inputs, embeds)
    if not fuse_inside:
        transformer.fuse_qkv_projections()
    with torch.no_grad():
        with ConceptAttention(transformer, NAMES, concept_embeds=embeds) as fused:
            if fuse_inside:
                transformer.fuse_qkv_projections()
            outputs = [transformer(**inputs).sample for _ in range(calls)]
        plain = transformer(**inputs).sample
    return reference, fused, outputs, plain


def as_tokens(maps):
    """Maps as ``(batch, tokens, concepts)``, tokens in grid order."""
    b, c = maps.tensor.shape[:2]
    return maps.tensor.reshape(b, c, -1).permute(0, 2, 1)


# ---------------------------------------------------------------- the mask-formulation oracle
def isolation_mask(text, rows, image):
    """Which ``[prompt, concepts, image]`` rows may attend to which: nothing sees the concepts but the
    concepts themselves, and they do not see the prompt (True = allowed)."""
    total = text + rows + image
    allowed = torch.ones(total, total, dtype=torch.bool)
    concept = slice(text, text + rows)
    allowed[:, concept] = False  # nobody attends to concepts ...
    allowed[concept, concept] = True  # ... except concepts themselves
    allowed[concept, :text] = False  # concepts do not attend to the prompt
    return allowed


def with_concepts_appended(inputs, embeds):
    """A copy of ``inputs`` whose prompt rows are followed by the concept rows."""
    batch = inputs["hidden_states"].shape[0]
    appended = torch.cat(embeds, dim=0).expand(batch, -1, -1)
    return dict(inputs, encoder_hidden_states=torch.cat([inputs["encoder_hidden_states"], appended], dim=1))


@contextlib.contextmanager
def captured_streams(transformer, text, image_tokens=None):
    """Per dual block of a FLUX-style model: image (``x``) and concept (``c``) attention outputs before the
    output projections, and their values (``vx``, ``vc``); image tokens cut to ``image_tokens``."""
    captured, handles = {}, []
    for index, block in enumerate(transformer.transformer_blocks):
        attn = block.attn
        handles.append(attn.to_out[0].register_forward_pre_hook(
            lambda m, a, i=index: captured.__setitem__(("x", i), a[0][:, :image_tokens])))
        handles.append(attn.to_add_out.register_forward_pre_hook(
            lambda m, a, i=index: captured.__setitem__(("c", i), a[0][:, text:])))
        handles.append(attn.to_v.register_forward_hook(
            lambda m, a, o, i=index: captured.__setitem__(("vx", i), o[:, :image_tokens])))
        handles.append(attn.add_v_proj.register_forward_hook(
            lambda m, a, o, i=index: captured.__setitem__(("vc", i), o[:, text:])))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def grouped_scores(scores, embeds, softmax=True):
    """``(B, N, rows)`` scores averaged over each concept's rows, then softmax over concepts."""
    columns, start = [], 0
    for e in embeds:
        columns.append(scores[..., start:start + e.shape[0]].mean(dim=-1))
        start += e.shape[0]
    grouped = torch.stack(columns, dim=-1)
    return grouped.softmax(dim=-1) if softmax else grouped


def complex_rope(ids, axes, theta):
    """Lumina-style complex RoPE table ``(S, sum(axes)/2)`` in complex128 from position ids ``(S, len(axes))``."""
    parts = []
    for axis, dim in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(torch.polar(torch.ones(ids.shape[0], dim // 2, dtype=torch.float64),
                                 ids[:, axis].double()[:, None] * freqs[None]))
    return torch.cat(parts, dim=-1)


def rotate_complex(rows, freqs):
    """(B, S, H, D) rows times complex ``freqs`` ((B,) S, D/2): consecutive pairs are complex numbers."""
    pairs = torch.view_as_complex(rows.reshape(*rows.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * freqs.unsqueeze(-2)).flatten(-2)


def oracle_block_scores(space, image_tokens, outputs, values, image_keys, concept_queries, heads, embeds,
                        softmax=True):
    """One block's float64 oracle map ``(B, N, C)`` from per-head tensors ``(B, tokens, heads, dim)``: image and
    concept attention outputs, values, or image keys against concept queries (scaled as the library scales
    cross-attention), scored over the first ``image_tokens`` image rows (all when ``None``)."""
    image, concept = {"output": outputs, "value": values, "cross_attention": (image_keys, concept_queries)}[space]
    scores = torch.einsum("bnhd,brhd->bnr", image[:, :image_tokens], concept)
    if space == "cross_attention":
        scores = scores / (heads * math.sqrt(concept_queries.shape[-1]))
    return grouped_scores(scores, embeds, softmax)


def assert_matches_oracle_maps(oracle_maps, transformer, inputs, embeds, layers,
                               spaces=("output", "value", "cross_attention")):
    """The session's maps in every space of ``spaces`` agree with ``oracle_maps(...)`` to 1e-5."""
    ca = record_maps(transformer, inputs, embeds, layers=layers, space=list(spaces))
    for space in spaces:
        expected = oracle_maps(transformer, inputs, embeds, layers, space=space)
        got = as_tokens(ca.maps_for(space)).double()
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (space, (got - expected).abs().max())
    return ca


def oracle_from_captured(captured, embeds, layers, softmax=True, space="output"):
    """Maps ``(B, N, C)`` in float64 from captured ``x``/``c`` (output space) or ``vx``/``vc`` (value space)."""
    image, concept = ("x", "c") if space == "output" else ("vx", "vc")
    per_layer = []
    for layer in layers:
        scores = torch.einsum("bnd,brd->bnr", captured[(image, layer)].double(), captured[(concept, layer)].double())
        per_layer.append(grouped_scores(scores, embeds, softmax))
    return torch.stack(per_layer).mean(0)


def assert_matches_oracle(ca, oracle, spaces=("output", "value")):
    """``ca``'s maps in each space equal ``oracle(space)`` (``(B, N, C)`` float64)."""
    for space in spaces:
        expected = oracle(space)
        got = as_tokens(ca.maps_for(space)).double()
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (space, (got - expected).abs().max())


# ---------------------------------------------------------------- explain, generate, CLI
def check_explain_and_cli(pipe, tmp_path, defaults, **explain_options):
    """Save ``pipe`` with ``concept_attention.json`` = ``defaults`` (size 32, 2 steps, 16 tokens + extras); explain
    a 40×24 picture (model size 52×32: 8×13 maps); run the CLI's ``generate`` and ``explain`` on the saved folder.

    Returns the ConceptMaps the CLI's ``generate`` wrote, loaded back.
    """
    import json

    import numpy as np
    from PIL import Image

    from concept_attention import ConceptMaps, explain
    from concept_attention.cli import main

    pipe.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "concept_attention.json").write_text(
        json.dumps({"size": 32, "num_inference_steps": 2, "max_sequence_length": 16, **defaults}))
    picture = Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype("uint8"))
    pipe.default_sample_size = 16
    maps = explain(pipe, picture, ["dog", "sky"], num_samples=2, max_sequence_length=16, **explain_options)
    assert maps.tensor.shape == (1, 2, 8, 13) and maps.meta["model_size"] == [52, 32]
    assert torch.allclose(maps.tensor.sum(1), torch.ones(1, 8, 13), atol=1e-5)
    picture.save(tmp_path / "photo.png")
    model = str(tmp_path / "model")
    assert main(["generate", "a dog by a tree", "--concepts", "dog,tree", "--model", model, "--out",
                 str(tmp_path / "gen"), "--device", "cpu"]) == 0
    generated = ConceptMaps.load(tmp_path / "gen")
    assert generated.tensor.shape == (1, 2, 8, 8)
    assert main(["explain", str(tmp_path / "photo.png"), "--concepts", "dog,sky", "--model", model, "--out",
                 str(tmp_path / "exp"), "--device", "cpu"]) == 0
    assert ConceptMaps.load(tmp_path / "exp").tensor.shape == (1, 2, 8, 13)
    return generated


# ---------------------------------------------------------------- restore
def snapshot(transformer):
    """Processors (of every module that has one), every module's forward hooks and the transformer's attributes."""
    processors = {f"{name}.processor": module.processor for name, module in transformer.named_modules()
                  if hasattr(module, "processor")}
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in transformer.named_modules()}
    return processors, hooks, set(transformer.__dict__)


def assert_restored(transformer, before):
    processors, hooks, attributes = snapshot(transformer)
    assert processors.keys() == before[0].keys()
    assert all(processors[k] is before[0][k] for k in processors)
    for name, (fwd, pre) in hooks.items():
        assert fwd.keys() == before[1][name][0].keys() and pre.keys() == before[1][name][1].keys(), name
    assert attributes == before[2]


# ---------------------------------------------------------------- tiny tokenizers and attention
def word_tokenizer(words, specials, pad, eos, extra=()):
    """A byte-level word tokenizer: one token per known word (with or without a leading space), e.g. so the
    Qwen-Image system template is exactly 34 tokens long, as with the real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    space, newline = bytes_to_unicode()[ord(" ")], bytes_to_unicode()[ord("\n")]
    pieces = ["<unk>", ",", ":", newline, space, *extra] + [p for w in words for p in (w, space + w)]
    model = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(dict.fromkeys(pieces))}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    model.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token=pad, eos_token=eos, unk_token="<unk>",
                                   additional_special_tokens=list(specials), model_max_length=2048)


def attend(query, key, value, keep=None):
    """Softmax attention (B, S, H, D); ``keep`` (B, keys) drops masked keys."""
    logits = torch.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(query.shape[-1])
    if keep is not None:
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), value)
