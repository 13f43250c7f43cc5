"""Attention backends (``set_attention_backend`` and the ``attention_backend`` context): the native ones that run on
the CPU (``native``, ``_native_math``, ``flex``).

The image path's attention is the original processor's, with the backend it was given; the concept
attention is the library's own (concept queries over image and concept keys). So the maps agree across
backends to the backends' own rounding differences, and a backend chosen while a session is installed
reaches the wrapped processors (and stays after the session).
"""

from __future__ import annotations

import pytest
import torch

from mechanisms import flux_pipe, generate, max_difference, watched_run

BACKENDS = ["native", "_native_math", "flex"]
TOLERANCE = 1e-5
"""Outputs and maps of one backend against ``native`` (two steps, true CFG): measured up to 1.4e-6 (outputs) and
9e-8 (maps)."""


@pytest.fixture(autouse=True)
def restore_the_active_backend():
    """``set_attention_backend`` also changes diffusers' process-wide default backend: put it back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.fixture(scope="module")
def reference():
    pipe = flux_pipe()
    plain = generate(pipe)
    _, session = watched_run(pipe, lambda: generate(pipe))
    return plain, session.maps


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_set_before_the_session(backend, reference):
    plain_native, maps_native = reference
    pipe = flux_pipe()
    pipe.transformer.set_attention_backend(backend)
    plain = generate(pipe)
    assert max_difference(plain, plain_native) < TOLERANCE
    watched, session = watched_run(pipe, lambda: generate(pipe))
    assert torch.equal(watched, plain)
    assert max_difference(session.maps.tensor, maps_native.tensor) < TOLERANCE


def test_backend_set_inside_the_session_reaches_the_wrapped_processors():
    from concept_attention import ConceptAttention
    from mechanisms import CONCEPTS

    pipe, flex = flux_pipe(), flux_pipe()
    pipe.transformer.set_attention_backend("native")
    flex.transformer.set_attention_backend("flex")
    expected = generate(flex)
    assert not torch.equal(expected, generate(pipe))  # the backends round differently here
    with ConceptAttention(pipe, CONCEPTS) as session:
        pipe.transformer.set_attention_backend("flex")
        watched = generate(pipe)
    assert torch.equal(watched, expected) and session.maps.steps == [0, 1]
    assert pipe.transformer.transformer_blocks[0].attn.processor._attention_backend.value == "flex"
    assert torch.equal(generate(pipe), expected)


def test_the_wrapped_processor_keeps_its_backend_when_the_default_differs():
    """A model's own backend, not diffusers' process-wide default, runs its image path inside a session."""
    pipe, other = flux_pipe(), flux_pipe()
    pipe.transformer.set_attention_backend("flex")
    other.transformer.set_attention_backend("native")  # the process-wide default is now "native"
    plain = generate(pipe)
    assert not torch.equal(plain, generate(other))  # the backends round differently here
    watched, _ = watched_run(pipe, lambda: generate(pipe))
    assert torch.equal(watched, plain)


def test_attention_backend_context():
    from diffusers.models.attention_dispatch import attention_backend

    pipe, flex = flux_pipe(), flux_pipe()
    flex.transformer.set_attention_backend("flex")
    expected = generate(flex)
    with attention_backend("flex"):
        plain = generate(pipe)
        watched, session = watched_run(pipe, lambda: generate(pipe))
    assert torch.equal(plain, watched) and torch.equal(watched, expected)
