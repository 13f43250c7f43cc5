"""Model-independent ConceptAttention math: concept attention, scores, softmax, running sums.

Every tensor of token vectors here uses the layout ``(batch, tokens, heads, head_dim)``; adapters
convert their model's layout before calling in. Nothing in this module names a model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SPACES = ("output", "cross_attention", "value")
"""Spaces a saliency map can be read in.

- ``output``: dot products of the attention *outputs* before the output projection, ``o_x · o_c``
  (ConceptAttention, paper §4.1).
- ``cross_attention``: concept-query / image-key logits ``q_c · k_x / sqrt(d)``, mean over heads
  (the raw cross-attention baseline).
- ``value``: dot products of the value vectors ``v_x · v_c`` (the value-space baseline).
"""


@dataclass(frozen=True)
class ConceptGroups:
    """Which rows of the concept stream belong to which concept (multi-token concepts)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.sizes):
            raise ValueError("names and sizes must have the same length")
        if any(s < 1 for s in self.sizes):
            raise ValueError("every concept needs at least one token row")

    @property
    def num_rows(self) -> int:
        return sum(self.sizes)

    def averaging_matrix(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(rows, concepts) float32 matrix whose column c averages the rows of concept c."""
        matrix = torch.zeros(self.num_rows, len(self.sizes), dtype=torch.float32, device=device)
        start = 0
        for column, size in enumerate(self.sizes):
            matrix[start : start + size, column] = 1.0 / size
            start += size
        return matrix


@dataclass
class BlockActivations:
    """What one dual-stream block exposes for concept scoring, layout (B, S, H, D).

    ``image_*`` cover every image token the concepts may attend to; maps use the first
    ``num_map_tokens`` of them (generated-image tokens, before any reference tokens).
    """

    concept_query: torch.Tensor
    concept_key: torch.Tensor
    concept_value: torch.Tensor
    image_key: torch.Tensor
    image_value: torch.Tensor
    image_output: torch.Tensor
    concept_output: torch.Tensor | None = None
    num_map_tokens: int | None = None

    def rows(self, index: slice) -> "BlockActivations":
        """The same activations for a subset of batch rows (e.g. the conditional CFG half)."""
        return BlockActivations(
            concept_query=self.concept_query[index],
            concept_key=self.concept_key[index],
            concept_value=self.concept_value[index],
            image_key=self.image_key[index],
            image_value=self.image_value[index],
            image_output=self.image_output[index],
            concept_output=None if self.concept_output is None else self.concept_output[index],
            num_map_tokens=self.num_map_tokens,
        )


def concept_attention(
    concept_query: torch.Tensor,
    concept_key: torch.Tensor,
    concept_value: torch.Tensor,
    image_key: torch.Tensor,
    image_value: torch.Tensor,
    *,
    cross_attention: bool = True,
    self_attention: bool = True,
) -> torch.Tensor:
    """Attention of concept queries over ``[image keys; concept keys]``, layout (B, S, H, D).

    Only ``r × (N + r)`` scores per head are formed; image tokens never query anything here.
    With ``cross_attention=False`` concepts see only concept keys, with ``self_attention=False``
    only image keys; with neither, each concept row keeps its own value (paper Table 4).
    """
    if not cross_attention and not self_attention:
        return concept_value
    parts = []
    if cross_attention:
        parts.append((image_key, image_value))
    if self_attention:
        parts.append((concept_key, concept_value))
    if len(parts) == 1:
        key, value = parts[0]
        out = F.scaled_dot_product_attention(
            concept_query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        )
        return out.transpose(1, 2)
    # Softmax over the union of both key sets without concatenating them (no copy of the image
    # keys and values): combine the two partial softmaxes through a shared maximum.
    dtype = concept_query.dtype
    query = concept_query.float() * concept_query.shape[-1] ** -0.5
    logits = [torch.einsum("brhd,bshd->bhrs", query, key.float()) for key, _ in parts]
    peak = torch.maximum(logits[0].amax(dim=-1, keepdim=True), logits[1].amax(dim=-1, keepdim=True))
    weights = [torch.exp(item - peak) for item in logits]
    total = weights[0].sum(dim=-1, keepdim=True) + weights[1].sum(dim=-1, keepdim=True)
    out = sum(torch.einsum("bhrs,bshd->brhd", w, value.float()) for w, (_, value) in zip(weights, parts))
    return (out / total.permute(0, 2, 1, 3)).to(dtype)


def token_scores(space: str, act: BlockActivations) -> torch.Tensor:
    """Raw per-row scores ``(B, N_map, rows)`` in float32 for one space."""
    n = act.num_map_tokens if act.num_map_tokens is not None else act.image_output.shape[1]
    if space == "output":
        if act.concept_output is None:
            raise ValueError("concept_output is required for the output space")
        return _dots(act.image_output[:, :n], act.concept_output)
    if space == "value":
        return _dots(act.image_value[:, :n], act.concept_value)
    if space == "cross_attention":
        heads, head_dim = act.concept_query.shape[2], act.concept_query.shape[3]
        return _dots(act.image_key[:, :n], act.concept_query) / (heads * head_dim**0.5)
    raise ValueError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}")


def _dots(image: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
    """``(B, N, rows)`` dot products over heads and head dims, in float32: one matrix product over
    ``(B, N, H·D)`` (the einsum ``bnhd,brhd->bnr`` read the image vectors several times)."""
    return torch.matmul(image.flatten(2).float(), concept.flatten(2).float().transpose(1, 2))


def concept_maps(
    scores: torch.Tensor, averaging: torch.Tensor, *, softmax: bool
) -> torch.Tensor:
    """Group rows into concepts (mean of row scores) then optionally softmax over concepts.

    ``scores`` is ``(B, N, rows)``; ``averaging`` is :meth:`ConceptGroups.averaging_matrix`.
    Averaging scores over a concept's rows equals dotting with the mean of its row vectors.
    """
    grouped = scores @ averaging
    if softmax and grouped.shape[-1] > 1:
        grouped = grouped.softmax(dim=-1)
    return grouped


class RunningMaps:
    """Running sums of per-(layer, step) maps for each space, kept on the maps' device.

    ``add`` takes ``(B, N, C)`` maps; ``mean`` returns ``(L, B, N, C)`` averaged over the steps
    each layer saw. Memory is ``L × B × N × C`` floats per space, independent of the step count.
    """

    def __init__(self, layers: list[int], spaces: tuple[str, ...]) -> None:
        self.layers = list(layers)
        self.spaces = tuple(spaces)
        self._position = {layer: i for i, layer in enumerate(self.layers)}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts = torch.zeros(len(self.layers), dtype=torch.long)

    @property
    def empty(self) -> bool:
        return not self._sums

    def add(self, layer: int, space: str, maps: torch.Tensor) -> None:
        position = self._position[layer]
        total = self._sums.get(space)
        if total is None:
            total = maps.new_zeros((len(self.layers), *maps.shape), dtype=torch.float32)
            self._sums[space] = total
        elif total.shape[1:] != maps.shape:
            raise RuntimeError(
                f"maps of shape {tuple(maps.shape)} cannot join a running sum of shape "
                f"{tuple(total.shape[1:])}: a ConceptAttention session must see inputs of one "
                "batch size and image size; open a new session for a different shape"
            )
        total[position] += maps.float()
        if space == self.spaces[0]:
            self._counts[position] += 1

    def counts(self) -> list[int]:
        return self._counts.tolist()

    def mean(self, space: str) -> torch.Tensor:
        total = self._sums[space]
        counts = self._counts.to(total.device).clamp(min=1).float()
        return total / counts.view(-1, *([1] * (total.dim() - 1)))
