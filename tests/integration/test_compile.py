"""``torch.compile`` of the transformer: regional (diffusers' ``compile_repeated_blocks(fullgraph=True)``), the whole
model in place (``transformer.compile()``) and as a wrapper (``pipe.transformer = torch.compile(...)``), compiled
before the session is entered or while it is installed.

The session's call bookkeeping runs before any compiled code, and what runs inside the blocks reads no
per-block or per-step Python value: no graph break comes from the session, and after one warm-up run
(a handful of graphs: blocks that record maps, feed a later block, or neither; conditional or not) further
steps and further sessions compile nothing. Dynamo's behaviour (graph breaks, guards, recompiles) does not
depend on the backend, so these tests trace with the ``"eager"`` backend (outputs and maps then equal the
uncompiled run exactly); the inductor run is the ``slow`` test (outputs within ``INDUCTOR_TOLERANCE``).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from concept_attention import ConceptAttention
from mechanisms import CONCEPTS, flux_pipe, generate, max_difference, watched_run

GRAPHS_PER_WARM_UP = 6
"""Upper bound on the graphs compiled while a session warms up (regional: measured 4, whatever the number of
blocks; whole model: 1)."""
INDUCTOR_TOLERANCE = 1e-4
"""Inductor (CPU, fp32, regional) against eager: measured 1.1e-6 on the output, 6e-8 on the maps."""


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def compiled_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def eager_reference(layers: int = 4, guidance: bool = True):
    """A fresh pipeline, its plain output and its session maps, all uncompiled."""
    pipe = flux_pipe(layers=layers)
    plain = generate(pipe, guidance=guidance)
    _, session = watched_run(pipe, lambda: generate(pipe, guidance=guidance))
    return pipe, plain, session.maps


def check_steady(pipe, plain: torch.Tensor, maps, guidance: bool, tolerance: float = 0.0) -> None:
    """Another session and another plain run compile nothing and agree with the eager reference."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        watched, session = watched_run(pipe, lambda: generate(pipe, guidance=guidance))
        again = generate(pipe, guidance=guidance)
    assert torch.equal(watched, again) and max_difference(again, plain) <= tolerance
    assert session.maps.steps == [0, 1] and max_difference(session.maps.tensor, maps.tensor) <= tolerance


def test_regional_compile_has_no_graph_break_and_no_recompilation():
    pipe, plain, maps = eager_reference(layers=10)  # more blocks than torch._dynamo.config.recompile_limit
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")  # a graph break would raise
    compiled_plain = generate(pipe)
    assert torch.equal(compiled_plain, plain)
    before = compiled_graphs()
    watched, session = watched_run(pipe, lambda: generate(pipe))  # warm-up: CFG, recorded and unrecorded blocks
    assert torch.equal(watched, compiled_plain)
    assert session.maps.steps == [0, 1] and torch.equal(session.maps.tensor, maps.tensor)
    assert 0 < compiled_graphs() - before <= GRAPHS_PER_WARM_UP
    check_steady(pipe, plain, maps, guidance=True)
    assert graph_breaks() == 0


def test_whole_model_compiled_inside_then_outside_the_session():
    pipe, plain, maps = eager_reference(layers=2, guidance=False)
    with torch.no_grad():
        with ConceptAttention(pipe, CONCEPTS) as session:
            pipe.transformer.compile(backend="eager")
            watched = generate(pipe, guidance=False)
    assert torch.equal(watched, plain) and torch.equal(session.maps.tensor, maps.tensor)
    assert graph_breaks() == 0 and 0 < compiled_graphs() <= GRAPHS_PER_WARM_UP
    assert torch.equal(generate(pipe, guidance=False), plain)  # the plain model, compiled after the session
    check_steady(pipe, plain, maps, guidance=False)
    assert graph_breaks() == 0


def test_compiled_wrapper_given_to_the_session():
    pipe, plain, maps = eager_reference(layers=2, guidance=False)
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    assert torch.equal(generate(pipe, guidance=False), plain)
    watched, session = watched_run(pipe, lambda: generate(pipe, guidance=False))
    assert torch.equal(watched, plain) and torch.equal(session.maps.tensor, maps.tensor)
    assert type(pipe.transformer).__name__ == "OptimizedModule"  # given back as it was
    check_steady(pipe, plain, maps, guidance=False)
    assert graph_breaks() == 0


@pytest.mark.slow
def test_inductor_matches_eager_within_tolerance():
    pipe, plain, maps = eager_reference()
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    compiled_plain = generate(pipe)
    watched, session = watched_run(pipe, lambda: generate(pipe))
    assert torch.equal(watched, compiled_plain) and max_difference(watched, plain) < INDUCTOR_TOLERANCE
    print(f"inductor against eager: output {max_difference(watched, plain):.1e}, "
          f"maps {max_difference(session.maps.tensor, maps.tensor):.1e}")
    assert max_difference(session.maps.tensor, maps.tensor) < INDUCTOR_TOLERANCE
    check_steady(pipe, plain, maps, guidance=True, tolerance=INDUCTOR_TOLERANCE)
    assert graph_breaks() == 0
