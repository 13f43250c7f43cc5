"""Quality of concept maps on held-out synthetic scenes with exact masks (embedded model).

For each scene (fixed seeds, never used in training) the image is explained once per prompt
("caption" = the scene's caption, "empty" = no prompt) with every dual block recorded and the three
spaces (output = ConceptAttention, cross_attention, value) read in the same pass. Two tasks:

- colour: concepts = every colour word + every background word (grass, sky, wall);
- shape:  concepts = every shape word  + every background word.

Scores per method (argmax over concepts; background words → class 0):
- ``acc``/``mIoU``: pixel accuracy and mIoU over the 5 classes (dataset-level, as the paper);
- ``identity``: on object pixels, how often the object's own word wins among the words of its kind
  (chance = 1/4): a map that only finds "an object" scores at chance here;
- ``bin mIoU``/``bin AP``: the paper's binary protocol for the object's own word (its map thresholded
  at its mean; AP of the soft map), averaged over objects.
The "all background" row predicts class 0 everywhere.

Methods: ConceptAttention (output space), concept cross-attention and value space come from
:func:`concept_attention.explain`. The **prompt cross-attention** baseline (DAAM-style, the paper's
"cross attention" baseline) is read in the same ``explain`` call of the caption prompt by hooks on
each FLUX.1 dual block (:class:`PromptCrossAttention`): the caption's own T5 tokens attending to
the image keys, ``softmax over image tokens of (q_p · k_x / sqrt(d))`` with the processor's qk-norm
and rotary embedding, averaged over heads and noise samples, then over the same blocks as the
other methods (default blocks / all blocks). For a model whose maps were partly trained
(``grounded_blocks`` in its ``concept_attention.json``), every method is also scored on the trained and on
the untrained blocks separately. A concept word's map is the mean over its positions
in the caption (every occurrence; a word split into several pieces averages its pieces); a word
absent from the caption gets an all-zero map. This baseline exists only for the "caption" prompt,
and it is an *easier* setting than open-vocabulary concept maps: the caption names exactly the
objects and the background in the image, and an absent word (the other colours/shapes, the other
two backgrounds) can never win the argmax, so e.g. a one-object scene is a two-way choice between
the object's word and its background's word; its ``identity`` would be 1 by construction and is
reported as n/a (as for "all background"). Per-word maps are normalised to
sum 1 over the image before the argmax (as DAAM and peers); with the softmax over image tokens
they already do (and the joint [text; image] softmax restricted to the image and renormalised
gives the same maps), so this only guards rounding.

Usage: ``python benchmarks/scenes.py [--model DIR] [--scenes 200] [--timestep 0.5] [--out results/scenes]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from concept_attention import explain, load_pipeline
from concept_attention.evaluation.metrics import ConfusionMatrix, binary_scores
from concept_attention.evaluation.scenes import HELD_OUT_SEED, VALIDATION_SEED
from concept_attention.scenes.render import BACKGROUNDS, COLOURS, SHAPES, render_scene
from concept_attention.viz import upsample

SPACES = ("output", "cross_attention", "value")
PROMPT_CROSS_ATTENTION = "prompt cross-attention"


class TaskScores:
    """Accumulates argmax, identity and binary scores for one (task, method)."""

    def __init__(self, words: list[str], identity: bool = True) -> None:
        self.words = words
        self.scores_identity = identity  # False where it is not a test (a word absent from the maps cannot win)
        self.confusion = ConfusionMatrix(len(words) + 1, ignore_index=None)
        self.identity_hits = 0
        self.identity_total = 0
        self.binary_miou: list[float] = []
        self.binary_ap: list[float] = []

    def add(self, soft: torch.Tensor, scene, kind: str) -> None:
        """``soft``: (concepts, H, W) maps at image size; concepts = words then backgrounds."""
        truth = np.zeros(scene.background_mask.shape, dtype=np.int64)
        for obj in scene.objects:
            truth[obj.mask] = self.words.index(getattr(obj, kind)) + 1
        winners = soft.argmax(dim=0).numpy()
        predicted = np.where(winners < len(self.words), winners + 1, 0)
        self.confusion.update(predicted, truth)
        kind_scores = soft[: len(self.words)].numpy()
        best_word = kind_scores.argmax(axis=0)
        for obj in scene.objects:
            own = self.words.index(getattr(obj, kind))
            self.identity_hits += int((best_word[obj.mask] == own).sum())
            self.identity_total += int(obj.mask.sum())
            scores = binary_scores(soft[own].numpy(), obj.mask.astype(np.uint8), ignore_index=None)
            self.binary_miou.append(scores.miou)
            self.binary_ap.append(scores.ap)

    def summary(self) -> dict[str, float]:
        return {
            "acc": self.confusion.pixel_accuracy(),
            "miou": self.confusion.miou(),
            "identity": self.identity_hits / max(1, self.identity_total) if self.scores_identity else float("nan"),
            "binary_miou": float(np.nanmean(self.binary_miou)) if self.binary_miou else float("nan"),
            "binary_ap": float(np.nanmean(self.binary_ap)) if self.binary_ap else float("nan"),
        }


class PromptCrossAttention:
    """Records, per FLUX.1 dual block, how the prompt's tokens attend to the image keys.

    Context manager around a forward of a ``FluxTransformer2DModel`` (e.g. an :func:`explain`
    call): forward hooks on each block's ``attn.norm_added_q`` (prompt queries after qk-norm,
    (B, S, H, D)) and ``attn.norm_k`` (image keys after qk-norm, (B, N, H, D)), and a forward
    pre-hook on ``attn`` for its ``image_rotary_emb`` (cos, sin over the concatenated
    [text; image] sequence) and the prompt length. As ``FluxAttnProcessor`` does, the rotary
    embedding is applied to queries/keys (text rows ``[:S]``, image rows ``[S:]``), then

        ``p[b, h, s, n] = softmax_n(q_p[b, s, h] · k_x[b, n, h] / sqrt(D))``

    over image tokens only, averaged over heads and the batch (noise samples): ``maps[block]``
    is (S, N), each row a distribution over the image tokens. Only the first ``norm_added_q``
    call of an attention forward with S rows counts (the ConceptAttention wrapper calls
    ``norm_added_q`` again for the concept rows afterwards). Hooks only read; everything is
    removed on exit, also after an error or an early exit. ``keep_qk`` keeps the rotated
    (query, key) of the last call per block (for tests).
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], indices: Sequence[int] | None = None,
                 keep_qk: bool = False) -> None:
        self.blocks = list(blocks)
        self.indices = list(range(len(self.blocks))) if indices is None else list(indices)
        self.keep_qk = keep_qk
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}
        self._state: dict[int, dict[str, Any]] = {}
        self._handles: list[Any] = []
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def maps(self) -> dict[int, torch.Tensor]:
        """(S, N) attention of each prompt token over the image tokens, per recorded block."""
        return {i: self._sums[i] / self._counts[i] for i in self._sums}

    def __enter__(self) -> "PromptCrossAttention":
        try:
            for index in self.indices:
                attn = self.blocks[index].attn
                self._handles += [
                    attn.register_forward_pre_hook(self._before(index), with_kwargs=True),
                    attn.norm_added_q.register_forward_hook(self._on_query(index)),
                    attn.norm_k.register_forward_hook(self._on_key(index)),
                    attn.register_forward_hook(self._after(index)),
                ]
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._state.clear()

    def _before(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if text is None:
                self._state.pop(index, None)
                return
            rotary = kwargs.get("image_rotary_emb", args[3] if len(args) > 3 else None)
            self._state[index] = {"text_len": text.shape[1], "rotary": rotary, "query": None, "key": None}
        return hook

    def _on_query(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            state = self._state.get(index)
            if state is not None and state["query"] is None and output.shape[1] == state["text_len"]:
                state["query"] = output.detach()
        return hook

    def _on_key(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            state = self._state.get(index)
            if state is not None and state["key"] is None:
                state["key"] = output.detach()
        return hook

    def _after(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            state = self._state.pop(index, None)
            if state is None:
                return
            if state["query"] is None or state["key"] is None:
                raise RuntimeError(f"dual block {index}: the attention processor did not call norm_added_q/norm_k "
                                   "as FluxAttnProcessor does; this diffusers version is not supported here")
            query, key = rotate(state["query"], state["key"], state["rotary"], state["text_len"])
            if self.keep_qk:
                self.qk[index] = (query, key)
            probs = prompt_image_attention(query, key)  # (B, H, S, N)
            mean = probs.mean(dim=(0, 1))
            self._sums[index] = self._sums.get(index, 0) + mean
            self._counts[index] = self._counts.get(index, 0) + 1
        return hook


def rotate(query: torch.Tensor, key: torch.Tensor, rotary: Any, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt queries (B, S, H, D) and image keys (B, N, H, D) rotated as ``FluxAttnProcessor`` rotates them.

    The processor applies ``apply_rotary_emb(·, (cos, sin), sequence_dim=1)`` to the concatenated
    [text; image] sequence; rotary is position-wise, so the text rows get ``cos[:S]`` and the image
    rows ``cos[S:]`` (FLUX.1's zero ``txt_ids`` make the text rotation the identity).
    """
    if rotary is None:
        return query, key
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rotary
    query = apply_rotary_emb(query, (cos[:text_len], sin[:text_len]), sequence_dim=1)
    key = apply_rotary_emb(key, (cos[text_len:], sin[text_len:]), sequence_dim=1)
    return query, key


def prompt_image_attention(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``softmax over image tokens of (q · k / sqrt(D))``: (B, S, H, D) × (B, N, H, D) → (B, H, S, N), float32."""
    logits = torch.einsum("bshd,bnhd->bhsn", query.float(), key.float()) * query.shape[-1] ** -0.5
    return logits.softmax(dim=-1)


def caption_positions(tokenizer: Any, caption: str, words: Sequence[str], length: int) -> list[list[int]]:
    """Token positions of each word in ``caption`` as the pipeline encodes it (T5, padded to ``length``).

    A word's pieces (tokenized alone, no special tokens; the embedded vocabulary has one "▁word"
    piece per word) are matched as a contiguous run of the caption's ids; every occurrence counts.
    An absent word has no positions.
    """
    ids = tokenizer(caption, padding="max_length", max_length=length, truncation=True).input_ids
    positions = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        found: list[int] = []
        if pieces:
            for start in range(len(ids) - len(pieces) + 1):
                if ids[start:start + len(pieces)] == pieces:
                    found += range(start, start + len(pieces))
        positions.append(found)
    return positions


def prompt_cross_attention_maps(per_block: dict[int, torch.Tensor], blocks: Sequence[int],
                                positions: Sequence[Sequence[int]], grid: tuple[int, int]) -> torch.Tensor:
    """(concepts, h, w) baseline maps: blocks averaged, then the word's positions; each map sums to 1.

    The rows of ``per_block[b]`` are already distributions over the image tokens (softmax over
    image tokens only; this equals the joint [text; image] softmax restricted to the image and
    renormalised), so the explicit normalisation to sum 1 over the image only guards rounding; it
    is what makes words comparable in the argmax (DAAM-style). Absent words stay all zero.
    """
    mean = torch.stack([per_block[b] for b in blocks]).mean(dim=0)  # (S, N)
    height, width = grid
    if mean.shape[1] != height * width:
        raise ValueError(f"{mean.shape[1]} image tokens do not fill the {height}x{width} grid")
    maps = torch.zeros(len(positions), height, width)
    for i, rows in enumerate(positions):
        if rows:
            word = mean[list(rows)].mean(dim=0).reshape(height, width)
            maps[i] = word / word.sum().clamp_min(1e-12)
    return maps


def prompt_length(pipe) -> int:
    """The T5 length ``explain`` encodes prompts with (library default, else the pipeline's own)."""
    from concept_attention.adapters.encoding import sequence_length
    from concept_attention.loading import pipeline_defaults

    return sequence_length(pipe, pipeline_defaults(pipe).get("max_sequence_length"), 512)


def all_background(scene, words: list[str], kind: str) -> torch.Tensor:
    """Maps that put every pixel in the background class."""
    height, width = scene.background_mask.shape
    soft = torch.zeros(len(words) + len(BACKGROUNDS), height, width)
    soft[len(words)] = 1.0
    return soft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="pipeline directory (default: the embedded model)")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--timestep", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=1, help="noise samples per scene")
    parser.add_argument("--prompts", default="caption,empty")
    parser.add_argument("--out", default="results/scenes")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="held-out test scenes (report) or validation scenes (choose settings)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    pipe = load_pipeline(args.model)
    from concept_attention.adapters import resolve_adapter

    dual_blocks = list(resolve_adapter(pipe.transformer).dual_blocks)
    num_blocks = len(dual_blocks)
    blocks = list(range(num_blocks))
    default_blocks = pipe_default_layers(pipe, num_blocks)
    block_groups = trained_block_groups(pipe, blocks)
    length = prompt_length(pipe)
    scene_size = native_scene_size(pipe)
    tasks = {"colour": (list(COLOURS), "colour"), "shape": (list(SHAPES), "shape")}
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    methods: dict[tuple[str, str, str], TaskScores] = {}

    def scores_for(task: str, prompt: str, method: str) -> TaskScores:
        key = (task, prompt, method)
        if key not in methods:
            methods[key] = TaskScores(tasks[task][0], identity=not (method == "all background"
                                                                  or method.startswith(PROMPT_CROSS_ATTENTION)))
        return methods[key]

    for index in range(args.scenes):
        scene = render_scene((HELD_OUT_SEED if args.split == "test" else VALIDATION_SEED) + index, scene_size)
        size = scene.background_mask.shape
        for task, (words, kind) in tasks.items():
            concepts = words + list(BACKGROUNDS)
            scores_for(task, "-", "all background").add(all_background(scene, words, kind), scene, kind)
            for prompt in prompts:
                text = scene.caption if prompt == "caption" else ""
                recorded = blocks if prompt == "caption" else []  # the baseline needs the caption
                with PromptCrossAttention(dual_blocks, recorded) as recorder:
                    maps = explain(pipe, scene.image, concepts, prompt=text, timestep=args.timestep,
                                   num_samples=args.samples, seed=index, layers=blocks, space=list(SPACES))
                for space in SPACES:
                    space_maps = maps if space == maps.space else maps.others[space]
                    label = {"output": "ConceptAttention", "cross_attention": "concept cross-attention",
                             "value": "value space"}[space]
                    default = space_maps.for_layers(default_blocks)
                    scores_for(task, prompt, f"{label} (default blocks)").add(
                        upsample(default.tensor[0], size), scene, kind)
                    scores_for(task, prompt, f"{label} (all blocks)").add(
                        upsample(space_maps.tensor[0], size), scene, kind)
                    for group, chosen in block_groups:
                        scores_for(task, prompt, f"{label} ({group})").add(
                            upsample(space_maps.for_layers(chosen).tensor[0], size), scene, kind)
                    if space == "output":
                        for block in blocks:
                            scores_for(task, prompt, f"ConceptAttention block {block}").add(
                                upsample(space_maps.for_layers([block]).tensor[0], size), scene, kind)
                if prompt == "caption":
                    positions = caption_positions(pipe.tokenizer_2, text, concepts, length)
                    grid = tuple(maps.tensor.shape[-2:])
                    if sorted(recorder.maps) != blocks or any(m.shape[0] != length for m in recorder.maps.values()):
                        raise RuntimeError("prompt cross-attention: not every block was recorded, or the prompt "
                                           "length differs from the tokenizer's padded length")
                    for label, chosen in (("default blocks", default_blocks), ("all blocks", blocks), *block_groups):
                        baseline = prompt_cross_attention_maps(recorder.maps, chosen, positions, grid)
                        scores_for(task, prompt, f"{PROMPT_CROSS_ATTENTION} ({label})").add(
                            upsample(baseline, size), scene, kind)
        if (index + 1) % 25 == 0:
            print(f"{index + 1}/{args.scenes} scenes, {time.perf_counter() - started:.0f} s", flush=True)

    results = {f"{t}|{p}|{m}": s.summary() for (t, p, m), s in methods.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"scenes": args.scenes, "split": args.split, "timestep": args.timestep, "samples": args.samples, "prompts": prompts,
            "default_layers": pipe_default_layers(pipe, num_blocks), "seconds": time.perf_counter() - started,
            "model": args.model or "embedded"}
    (out / "scenes.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = render_table(methods, args)
    (out / "scenes.md").write_text(table)
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s; wrote {out}/scenes.json and scenes.md")


def trained_block_groups(pipe, blocks: list[int]) -> list[tuple[str, list[int]]]:
    """For a model whose maps were partly trained (``grounded_blocks`` in its ``concept_attention.json``): the
    trained and the untrained blocks, each scored as a group of its own; else nothing."""
    from concept_attention.loading import pipeline_defaults

    trained = [b for b in pipeline_defaults(pipe).get("grounded_blocks") or [] if b in blocks]
    if not trained:
        return []
    untrained = [b for b in blocks if b not in trained]
    name = lambda chosen: ", ".join(str(b) for b in chosen)
    return [(f"trained blocks {name(trained)}", trained)] + ([(f"untrained blocks {name(untrained)}", untrained)]
                                                               if untrained else [])


def native_scene_size(pipe) -> int:
    """Scenes are rendered at the model's own size (its ``concept_attention.json``; 64 px if it has none):
    the same scenes at every size, drawn sharper, with masks at that size."""
    from concept_attention.loading import pipeline_defaults

    return int(pipeline_defaults(pipe).get("size", 64))


def pipe_default_layers(pipe, num_blocks: int) -> list[int]:
    from concept_attention.loading import pipeline_defaults

    return list(pipeline_defaults(pipe).get("layers") or range(num_blocks // 2, num_blocks))


def render_table(methods: dict, args) -> str:
    lines = [f"Held-out scenes: {args.scenes}, t = {args.timestep}, noise samples = {args.samples}.\n"]
    for task in ("colour", "shape"):
        lines.append(f"\n**{task} task** (concepts: every {task} word + grass, sky, wall; identity chance 0.25)\n")
        lines.append("| prompt | method | acc | mIoU | identity | bin mIoU | bin AP |")
        lines.append("|---|---|---|---|---|---|---|")
        for (t, prompt, method), scores in methods.items():
            if t != task:
                continue
            s = scores.summary()
            lines.append(f"| {prompt} | {method} | {s['acc']:.3f} | {s['miou']:.3f} | {'n/a' if np.isnan(s['identity']) else format(s['identity'], '.3f')} | "
                         f"{s['binary_miou']:.3f} | {s['binary_ap']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
