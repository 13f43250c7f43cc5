"""The conformance suite every model family passes: ``class TestFamily(FamilyCase, AdapterContract)``.

A family's case (in its test file) builds tiny random-config models and inputs; the checks here are
the generic promises of the library: the model's output is bit-identical with and without a session
(bare transformer, batched, non-square; pipeline with classifier-free guidance), maps come from the
conditional call only, maps equal an independent re-implementation (the family's oracle), every
processor and hook is restored after a normal exit and after an exception, unknown processors are
refused before anything is touched, sessions do not nest, and fused QKV projections give the same maps.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from concept_attention import ConceptAttention
from helpers import as_tokens, assert_restored, concept_embeds, fused_qkv_runs, record_maps, snapshot


class ForeignProcessor:
    """An attention processor no adapter knows (it only forwards to the original)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


class Boom(Exception):
    pass


class AdapterContract:
    """Generic checks; the case class supplies the members below."""

    concepts = ["dog", "tree", "sky"]
    attention = "attn"
    """Attribute of a dual block whose processor the adapter wraps."""
    oracle_options: dict = {}
    """Session options the oracle assumes (e.g. the modulation it re-implements)."""
    oracle_spaces: tuple[str, ...] = ("output",)
    blocks_name = "transformer_blocks"
    """Attribute of the transformer holding the mapped blocks (Lumina 2, Z-Image: ``layers``)."""
    output_name = "proj_out"
    """Path of a module that runs after the mapped blocks (the exception test raises there)."""

    # -- supplied by the case ------------------------------------------------------------------
    def make_transformer(self, seed: int) -> torch.nn.Module:
        raise NotImplementedError

    def make_inputs(self, transformer: torch.nn.Module, seed: int) -> dict:
        """Transformer keyword arguments for a batch of 2 on a non-square grid."""
        raise NotImplementedError

    def expected_grid(self, inputs: dict) -> tuple[int, ...]:
        raise NotImplementedError

    def oracle(self, transformer, inputs, embeds, layers, softmax, space) -> torch.Tensor:
        """Maps ``(B, N, C)`` in float64 by an independent formulation."""
        raise NotImplementedError

    def make_pipeline(self) -> Any:
        raise NotImplementedError

    def run_pipeline(self, pipe: Any, guidance: bool, negative: str = "a cat", prompt: str = "a dog by a tree",
                     steps: int = 2) -> torch.Tensor:
        """The pipeline's output (latents) for a non-square size, with classifier-free guidance or without."""
        raise NotImplementedError

    pipeline_grid: tuple[int, ...] = ()

    def run_transformer(self, transformer: torch.nn.Module, inputs: dict) -> torch.Tensor:
        """The transformer's output for ``inputs`` as one tensor."""
        return transformer(**inputs).sample

    def mapped_blocks(self, transformer: torch.nn.Module) -> Any:
        return getattr(transformer, self.blocks_name)

    # -- fixtures ------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def pipe(cls):
        pipe = cls().make_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- exactness -----------------------------------------------------------------------------
    def test_bare_transformer_is_bit_identical_and_maps_fill_the_grid(self):
        transformer = self.make_transformer(0)
        inputs = self.make_inputs(transformer, 0)
        embeds = concept_embeds(transformer)
        with torch.no_grad():
            plain = self.run_transformer(transformer, inputs)
            with ConceptAttention(transformer, self.concepts, concept_embeds=embeds) as ca:
                watched = self.run_transformer(transformer, inputs)
        assert torch.equal(plain, watched)
        maps = ca.maps.tensor
        assert maps.shape == (2, len(self.concepts), *self.expected_grid(inputs))
        assert torch.allclose(maps.sum(1), torch.ones_like(maps[:, 0]), atol=1e-5)
        assert not torch.allclose(maps[0], maps[1])  # each image its own maps

    def test_pipeline_with_guidance_is_bit_identical(self, pipe):
        kind = type(pipe)
        plain = self.run_pipeline(pipe, guidance=True)
        with ConceptAttention(pipe, self.concepts) as ca:
            watched = self.run_pipeline(pipe, guidance=True)
        assert torch.equal(plain, watched)
        assert type(pipe) is kind and "cache_context" not in pipe.transformer.__dict__  # hooks undone
        maps = ca.maps
        assert maps.tensor.shape == (1, len(self.concepts), *self.pipeline_grid)
        assert maps.steps == [0, 1] and len(maps.timesteps) == 2

    def test_guidance_maps_are_the_conditional_ones(self, pipe):
        runs = []
        for guidance, negative in ((True, "a cat"), (True, "grass and sky"), (False, "a cat")):
            with ConceptAttention(pipe, self.concepts, timesteps=[0]) as ca:
                self.run_pipeline(pipe, guidance=guidance, negative=negative)
            runs.append(ca.maps.tensor)
        assert torch.allclose(runs[0], runs[1], atol=1e-5) and torch.allclose(runs[0], runs[2], atol=1e-5)
        with ConceptAttention(pipe, self.concepts, timesteps=[0]) as other:
            self.run_pipeline(pipe, guidance=True, prompt="a red car in the sky")
        assert not torch.allclose(other.maps.tensor, runs[0], atol=1e-4)

    @pytest.mark.parametrize("softmax", [True, False])
    def test_maps_match_the_oracle(self, softmax):
        transformer = self.make_transformer(3)
        inputs = self.make_inputs(transformer, 4)
        embeds = concept_embeds(transformer, sizes=(1, 3, 2))
        layers = [0, len(self.mapped_blocks(transformer)) - 1]
        ca = record_maps(transformer, inputs, embeds, layers=layers, softmax=softmax, space=list(self.oracle_spaces),
                         **self.oracle_options)
        for space in self.oracle_spaces:
            expected = self.oracle(transformer, inputs, embeds, layers, softmax, space)
            got = as_tokens(ca.maps_for(space)).double()
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (space, (got - expected).abs().max())

    # -- restore and refusals ------------------------------------------------------------------
    def test_everything_restored_after_exit_and_after_an_exception(self):
        transformer = self.make_transformer(17)
        inputs = self.make_inputs(transformer, 0)
        embeds = concept_embeds(transformer)
        before = snapshot(transformer)
        with torch.no_grad(), ConceptAttention(transformer, self.concepts, concept_embeds=embeds):
            self.run_transformer(transformer, inputs)
        assert_restored(transformer, before)

        def explode(module, args):
            raise Boom("raised after the dual blocks")

        handle = transformer.get_submodule(self.output_name).register_forward_pre_hook(explode)
        before = snapshot(transformer)
        with pytest.raises(Boom), torch.no_grad():
            with ConceptAttention(transformer, self.concepts, concept_embeds=embeds):
                self.run_transformer(transformer, inputs)
        handle.remove()
        before[1][self.output_name][1].clear()
        assert_restored(transformer, before)
        with torch.no_grad():
            self.run_transformer(transformer, inputs)  # still runs

    def test_unknown_processor_refused_before_anything_is_touched(self):
        transformer = self.make_transformer(5)
        attn = getattr(self.mapped_blocks(transformer)[1], self.attention)
        attn.processor = ForeignProcessor(attn.processor)
        before = snapshot(transformer)
        with pytest.raises(TypeError, match=rf"{self.blocks_name}\.1\.{self.attention} uses ForeignProcessor"):
            with ConceptAttention(transformer, self.concepts, concept_embeds=concept_embeds(transformer)):
                pass
        assert_restored(transformer, before)

    def test_sessions_do_not_nest(self):
        transformer = self.make_transformer(6)
        embeds = concept_embeds(transformer)
        with ConceptAttention(transformer, self.concepts, concept_embeds=embeds):
            with pytest.raises(RuntimeError, match="nesting"):
                with ConceptAttention(transformer, self.concepts, concept_embeds=embeds):
                    pass

    def test_fused_qkv_gives_the_same_maps(self):
        transformer = self.make_transformer(13)
        inputs = self.make_inputs(transformer, 0)
        reference, fused, (out,), plain = fused_qkv_runs(transformer, inputs, concept_embeds(transformer))
        assert torch.equal(out, plain)
        assert torch.allclose(fused.maps.tensor, reference.maps.tensor, atol=1e-5)
