"""The model-independent math: groups, attention, scores, running sums."""

import pytest
import torch

from concept_attention.core.scoring import (
    BlockActivations, ConceptGroups, RunningMaps, concept_attention, concept_maps, token_scores,
)


def test_averaging_matrix():
    m = ConceptGroups(("a", "b"), (1, 3)).averaging_matrix()
    assert torch.allclose(m, torch.tensor([[1, 0], [0, 1 / 3], [0, 1 / 3], [0, 1 / 3]]))
    with pytest.raises(ValueError):
        ConceptGroups(("a",), (0,))


def test_concept_attention_matches_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    q, kc, vc = (torch.randn(2, 3, 2, 4, generator=g) for _ in range(3))
    kx, vx = (torch.randn(2, 5, 2, 4, generator=g) for _ in range(2))
    out = concept_attention(q, kc, vc, kx, vx)
    keys, values = torch.cat([kx, kc], 1), torch.cat([vx, vc], 1)
    weights = (torch.einsum("brhd,bshd->bhrs", q, keys) / 2.0).softmax(-1)
    expected = torch.einsum("bhrs,bshd->brhd", weights, values)
    assert torch.allclose(out, expected, atol=1e-6)
    cross_only = concept_attention(q, kc, vc, kx, vx, self_attention=False)
    weights = (torch.einsum("brhd,bshd->bhrs", q, kx) / 2.0).softmax(-1)
    assert torch.allclose(cross_only, torch.einsum("bhrs,bshd->brhd", weights, vx), atol=1e-6)
    assert concept_attention(q, kc, vc, kx, vx, self_attention=False, cross_attention=False) is vc


def test_scores_and_softmax():
    g = torch.Generator().manual_seed(1)
    t = lambda n: torch.randn(1, n, 2, 3, generator=g)  # noqa: E731
    act = BlockActivations(t(2), t(2), t(2), t(6), t(6), t(6), t(2), num_map_tokens=4)
    out = token_scores("output", act)
    assert out.shape == (1, 4, 2)
    assert torch.allclose(out[0, 1, 0], (act.image_output[0, 1] * act.concept_output[0, 0]).sum())
    cross = token_scores("cross_attention", act)
    assert torch.allclose(cross[0, 2, 1], (act.image_key[0, 2] * act.concept_query[0, 1]).sum() / (2 * 3**0.5))
    maps = concept_maps(out, ConceptGroups(("a", "b"), (1, 1)).averaging_matrix(), softmax=True)
    assert torch.allclose(maps.sum(-1), torch.ones(1, 4))
    with pytest.raises(ValueError, match="unknown space"):
        token_scores("keys", act)


def test_running_maps_mean_and_shape_guard():
    sums = RunningMaps([1, 4], ("output",))
    sums.add(1, "output", torch.ones(1, 3, 2))
    sums.add(1, "output", torch.zeros(1, 3, 2))
    sums.add(4, "output", torch.full((1, 3, 2), 2.0))
    mean = sums.mean("output")
    assert torch.allclose(mean[0], torch.full((1, 3, 2), 0.5)) and torch.allclose(mean[1], torch.full((1, 3, 2), 2.0))
    assert sums.counts() == [2, 1]
    with pytest.raises(RuntimeError, match="one\nbatch size|batch size"):
        sums.add(1, "output", torch.ones(2, 3, 2))
