"""Concept-encoding helpers shared by the adapters.

Each family's adapter decides *which* encoder and which rows form a concept; these helpers hold
the steps that are the same everywhere: the pipeline's default sequence length, the positions of
a text's word pieces (no special or padding tokens), and the per-concept row selection.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import nn


def call_default(pipeline: Any, name: str) -> Any:
    """The default of ``pipeline.__call__``'s parameter ``name``, or None."""
    try:
        parameter = inspect.signature(type(pipeline).__call__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def sequence_length(pipeline: Any, max_sequence_length: int | None, fallback: int) -> int:
    """``max_sequence_length`` if given, else the pipeline's own default, else ``fallback``."""
    return int(max_sequence_length or call_default(pipeline, "max_sequence_length") or fallback)


def word_positions(tokenizer: Any, texts: Sequence[str], length: int) -> list[list[int]]:
    """Positions of each text's word pieces (no special or padding tokens) when padded to ``length``."""
    return _word_positions(tokenizer, _tokenize(tokenizer, texts, length))


def encode_with_t5(tokenizer: Any, encoder: nn.Module, concepts: Sequence[str], length: int) -> list[torch.Tensor]:
    """Encode each concept alone, as the pipeline encodes a prompt; keep only its word pieces."""
    batch = _tokenize(tokenizer, concepts, length)
    device = next(encoder.parameters()).device
    with torch.no_grad():
        hidden = encoder(batch.input_ids.to(device), output_hidden_states=False)[0]
    return select_rows(concepts, hidden, _word_positions(tokenizer, batch))


def select_rows(concepts: Sequence[str], embeds: torch.Tensor, rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """``embeds[i, rows[i]]`` per concept as float32 on the CPU; a concept without rows is refused."""
    result = []
    for i, name in enumerate(concepts):
        if not rows[i]:
            raise ValueError(f"concept {name!r} has no tokens left after removing special tokens")
        result.append(embeds[i, list(rows[i])].float().cpu())
    return result


def _tokenize(tokenizer: Any, texts: Sequence[str], length: int) -> Any:
    return tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")


def _word_positions(tokenizer: Any, batch: Any) -> list[list[int]]:
    ids = batch.input_ids
    mask = batch.attention_mask.bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
    special = set(getattr(tokenizer, "all_special_ids", []))
    return [
        [j for j in range(ids.shape[1]) if mask[i, j] and int(ids[i, j]) not in special] for i in range(ids.shape[0])
    ]
