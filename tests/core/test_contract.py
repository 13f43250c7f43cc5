"""The adapter contract (core/contract.py): defaults of the base class, refusals, restore, registry."""

import pytest
import torch

import concept_attention.adapters  # noqa: F401  (registers the built-in families)
import tiny
from concept_attention.core.contract import (
    ModelAdapter, refuse_unknown, register_adapter, registered_adapters, resolve_adapter, supported_transformers,
)


class Bare(ModelAdapter):
    family = "bare"

    def encode_concepts(self, pipeline, concepts, max_sequence_length):
        return [torch.zeros(1, 4) for _ in concepts]

    def begin_call(self, bound, call):
        call.batch_size = 1

    def install(self, recorder, blocks):
        self.attach(recorder)


def test_base_class_defaults_read_the_transformer():
    adapter = Bare(tiny.flux_transformer(layers=4))
    assert len(adapter.dual_blocks) == 4 and adapter.concept_embed_dim == 32
    assert adapter.default_layers() == [2, 3]
    assert adapter.last_module_for(1) is adapter.dual_blocks[1]
    assert adapter.pipeline_cfg(None, None) == "context" and not adapter.is_auxiliary_call(None)
    with pytest.raises(NotImplementedError, match="bare family"):
        adapter.image_size_rule(None)
    noise = adapter.draw_noise((2, 3), torch.Generator().manual_seed(0))
    assert torch.equal(noise, torch.randn((2, 3), generator=torch.Generator().manual_seed(0)))


def test_restore_runs_every_undo_newest_first_even_after_a_failure():
    adapter, done = Bare(tiny.flux_transformer()), []
    adapter.on_undo(lambda: done.append("first"))

    def fail():
        done.append("failing")
        raise RuntimeError("undo failed")

    adapter.on_undo(fail)
    adapter.on_undo(lambda: done.append("last"))
    with pytest.raises(RuntimeError, match="undo failed"):
        adapter.restore()
    assert done == ["last", "failing", "first"]
    adapter.restore()  # nothing left to undo


def test_attach_and_forget_the_recorder():
    adapter, recorder = Bare(tiny.flux_transformer()), object()
    adapter.install(recorder, [0])
    assert adapter.recorder is recorder
    adapter.restore()
    assert adapter.recorder is None and adapter.current_call is None


def test_unknown_processors_and_models_are_refused_with_their_names():
    class Known:
        pass

    class Other:
        pass

    refuse_unknown(Known(), (Known,), "bare", "blocks.0.attn")
    with pytest.raises(TypeError, match=r"blocks\.0\.attn uses Other, which the bare adapter does not know \(expected Known\)"):
        refuse_unknown(Other(), (Known,), "bare", "blocks.0.attn")
    with pytest.raises(TypeError, match="supported transformer classes: .*FluxTransformer2DModel"):
        resolve_adapter(torch.nn.Linear(2, 2))


def test_registry_lists_each_adapter_once():
    before = registered_adapters()
    flux = next(cls for cls in before if cls.family == "flux")
    register_adapter(flux)
    assert registered_adapters() == before
    assert "FluxTransformer2DModel" in supported_transformers()
    assert type(resolve_adapter(tiny.flux_transformer())).__name__ == "FluxAdapter"
