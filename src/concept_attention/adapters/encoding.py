"""Concept-encoding helpers shared by the adapters.

Each family's adapter decides *which* encoder and which rows form a concept; these helpers hold
the steps that are the same everywhere: the pipeline's default sequence length, the positions of
a text's word pieces (no special or padding tokens), and the per-concept row selection.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Sequence

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
    batch = _tokenize(tokenizer, texts, length)
    positions = _word_positions(tokenizer, batch)
    warn_unknown_pieces(tokenizer, texts, batch.input_ids, positions)
    return positions


def encode_with_t5(tokenizer: Any, encoder: nn.Module, concepts: Sequence[str], length: int) -> list[torch.Tensor]:
    """Encode each concept alone, as the pipeline encodes a prompt; keep only its word pieces."""
    batch = _tokenize(tokenizer, concepts, length)
    device = next(encoder.parameters()).device
    with torch.no_grad():
        hidden = encoder(batch.input_ids.to(device), output_hidden_states=False)[0]
    positions = _word_positions(tokenizer, batch)
    warn_unknown_pieces(tokenizer, concepts, batch.input_ids, positions)
    return select_rows(concepts, hidden, positions)


def warn_unknown_pieces(tokenizer: Any, texts: Sequence[str], ids: torch.Tensor,
                        positions: Sequence[Sequence[int]]) -> None:
    """Warn when at least half of a concept's pieces are the tokenizer's unknown token (the model cannot read it)."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:
        return
    for text, row, found in zip(texts, ids, positions):
        count = int((row == unknown).sum())  # special tokens are not word pieces, but the unknown token stands for one
        pieces = len(found) + count if unknown not in [int(row[j]) for j in found] else len(found)
        if count and 2 * count >= pieces:
            warnings.warn(f"concept {text!r} is mostly unknown to this model's tokenizer ({count} of {pieces} "
                          "pieces are the unknown token): its map is not about that word", stacklevel=4)


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


def concept_token_span(ids: torch.Tensor, mask: torch.Tensor, template: Sequence[int]) -> torch.Tensor:
    """Absolute indices of a concept's own tokens in a chat-templated, padded sequence.

    ``template`` is the unpadded token list of the empty prompt in the same template: the longest
    common prefix and suffix with it are template tokens, what lies between is the concept.
    """
    positions = torch.nonzero(mask, as_tuple=False).flatten()
    tokens = ids[positions].tolist()
    prefix = 0
    limit = min(len(tokens), len(template))
    while prefix < limit and tokens[prefix] == template[prefix]:
        prefix += 1
    suffix = 0
    while (
        suffix < limit - prefix
        and tokens[len(tokens) - 1 - suffix] == template[len(template) - 1 - suffix]
    ):
        suffix += 1
    return positions[prefix : len(tokens) - suffix]


def encode_alone(pipeline: Any, encode: Callable[[str], torch.Tensor], texts: Sequence[str]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(token ids the text encoder saw, embeddings)`` of each text encoded alone by ``encode``.

    The ids are read with a forward pre-hook on ``pipeline.text_encoder``, so the pipeline's own
    tokenisation (template, padding) is what is seen.
    """
    seen: list[Any] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(kwargs.get("input_ids", args[0] if args else None))

    handle = pipeline.text_encoder.register_forward_pre_hook(grab, with_kwargs=True)
    results = []
    try:
        with torch.no_grad():
            for text in texts:
                seen.clear()
                embeds = encode(text)
                if len(seen) != 1 or not isinstance(seen[0], torch.Tensor) or seen[0].shape[0] != 1:
                    raise RuntimeError(f"could not read the token ids {type(pipeline).__name__} fed to its text "
                                       "encoder; cannot locate concept tokens")
                results.append((seen[0][0].cpu(), embeds[0]))
    finally:
        handle.remove()
    return results


def own_rows(pipeline: Any, concepts: Sequence[str], family: str, offset: int, **options: Any
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each concept's own rows (float32, CPU) and their row indices, encoded alone by ``pipeline.encode_prompt``.

    A concept's tokens are what differs from the empty prompt's (template prefix and suffix and the
    pipeline's padding removed); ``offset`` is how many leading encoder tokens the pipeline drops;
    ``options`` go to ``encode_prompt``.
    """
    if getattr(pipeline, "text_encoder", None) is None or not hasattr(pipeline, "encode_prompt"):
        raise TypeError(f"{type(pipeline).__name__} has no {family} prompt encoder (text_encoder/encode_prompt); "
                        "pass concept_embeds=[...] to encode concepts yourself")

    def encode(text: str) -> torch.Tensor:
        return pipeline.encode_prompt(prompt=[text], device=pipeline._execution_device, **options)[0]

    *encoded, (template_ids, _) = encode_alone(pipeline, encode, [*concepts, ""])
    pad = getattr(getattr(pipeline, "tokenizer", None), "pad_token_id", None)
    template = [int(i) for i in template_ids if pad is None or int(i) != pad]
    rows, positions = [], []
    for name, (ids, embeds) in zip(concepts, encoded):
        mask = torch.ones_like(ids, dtype=torch.bool) if pad is None else ids != pad
        span = concept_token_span(ids, mask, template) - offset
        span = span[(span >= 0) & (span < embeds.shape[0])]
        if span.numel() == 0:
            raise ValueError(f"concept {name!r} has no tokens of its own inside the prompt template")
        rows.append(embeds[span].float().cpu())
        positions.append(span)
    return rows, positions
