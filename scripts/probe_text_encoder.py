#!/usr/bin/env python
"""Diagnostic: does the embedded model's frozen T5 keep each caption word recognisable as its concept?

ConceptAttention encodes a concept alone ("red") and the prompt as a whole caption. If the text
encoder blurred the words of a caption together, no attention downstream could tie a concept to its
object. For held-out two-object captions, each colour, shape and background word's embedding (as the
pipeline encodes the caption) is compared by cosine similarity with every concept embedding (as
ConceptAttention encodes concepts): the word's own concept, the closest other concept, and how often
the own concept is the closest.

``--binding`` adds linear probes (ridge, 5-fold cross-validation) on every two-object caption "a c1 s1
and a c2 s2 on bg": can the shape word's state tell its *own* colour (c1 for s1) and how well does it
carry the *other* object's colour? With ``--build`` the probes run on the T5 that
``concept_attention.embedded.build_t5_encoder`` makes (the embedded model's frozen encoder) with and
without its local position bias, which measures what that bias does.

  python scripts/probe_text_encoder.py [--model DIR] [--captions 50]
  python scripts/probe_text_encoder.py --build --binding
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def ridge_accuracy(features: np.ndarray, labels: list[str], folds: int = 5) -> float:
    """Cross-validated accuracy of a one-vs-rest ridge classifier."""
    order = np.random.default_rng(0).permutation(len(labels))
    classes = sorted(set(labels))
    targets = np.array([[float(label == c) for c in classes] for label in labels])
    hits = []
    for part in np.array_split(order, folds):
        train = np.setdiff1d(order, part)
        x = np.c_[features[train], np.ones(len(train))]
        weights = np.linalg.solve(x.T @ x + 0.1 * np.eye(x.shape[1]), x.T @ targets[train])
        guess = (np.c_[features[part], np.ones(len(part))] @ weights).argmax(1)
        hits += list(np.array(classes)[guess] == np.array(labels)[part])
    return float(np.mean(hits))


def binding_probe(encoder, tokenizer, length: int) -> dict[str, float]:
    """From the first shape word's state: its own colour, and the other object's colour (accuracies)."""
    import itertools

    from concept_attention.scenes.render import BACKGROUNDS, COLOURS, SHAPES

    rows = [(c1, s1, c2, s2, bg) for c1, c2 in itertools.permutations(COLOURS, 2)
            for s1, s2 in itertools.permutations(SHAPES, 2) for bg in BACKGROUNDS]
    captions = [f"a {c1} {s1} and a {c2} {s2} on {bg}" for c1, s1, c2, s2, bg in rows]
    ids = tokenizer(captions, max_length=length, padding="max_length", truncation=True, return_tensors="pt").input_ids
    states = encoder(ids)[0][:, 2].numpy()  # the first shape word
    return {"own colour": ridge_accuracy(states, [r[0] for r in rows]),
            "other colour": ridge_accuracy(states, [r[2] for r in rows])}


def probe_build(length: int) -> None:
    """The binding probes on the embedded build's frozen T5, with and without its local position bias."""
    from concept_attention.embedded import build_t5_encoder, build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    with_bias = build_t5_encoder(tokenizer, seed=3).eval()
    without = build_t5_encoder(tokenizer, seed=3, local_bias=False).eval()
    print(f"linear probes on the first shape word of 432 two-object captions (T5 length {length}; chance 0.25)")
    print("| T5 | own colour | other object's colour |")
    print("|---|---|---|")
    for name, encoder in (("seeded random T5", without), ("with the local position bias (shipped)", with_bias)):
        result = binding_probe(encoder, tokenizer, length)
        print(f"| {name} | {result['own colour']:.2f} | {result['other colour']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="exported pipeline directory (default: the shipped model)")
    ap.add_argument("--captions", type=int, default=50)
    ap.add_argument("--build", action="store_true", help="probe the embedded build's T5 with and without its bias")
    ap.add_argument("--binding", action="store_true", help="the own/other colour probes (with --build)")
    args = ap.parse_args()
    if args.build:
        from concept_attention.embedded import MAX_SEQUENCE_LENGTH

        torch.set_grad_enabled(False)
        probe_build(MAX_SEQUENCE_LENGTH)
        return

    from concept_attention.adapters import resolve_adapter
    from concept_attention.adapters.encoding import sequence_length
    from concept_attention.evaluation.scenes import HELD_OUT_SEED
    from concept_attention.loading import load_pipeline, pipeline_defaults
    from concept_attention.scenes.render import BACKGROUNDS, COLOURS, SHAPES, render_scene

    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.model)
    length = sequence_length(pipe, pipeline_defaults(pipe).get("max_sequence_length"), 512)
    vocabulary = [*COLOURS, *SHAPES, *BACKGROUNDS]
    concept_rows = resolve_adapter(pipe.transformer).encode_concepts(pipe, vocabulary, length)
    concepts = torch.nn.functional.normalize(torch.stack([rows.mean(0) for rows in concept_rows]), dim=-1)

    captions, seed = [], HELD_OUT_SEED
    while len(captions) < args.captions:
        scene = render_scene(seed)
        seed += 1
        if len(scene.objects) == 2:
            captions.append(scene.caption)
    tokenizer = pipe.tokenizer_2
    embeds = pipe._get_t5_prompt_embeds(prompt=captions, max_sequence_length=length).float()
    word_ids = {tokenizer(w, add_special_tokens=False).input_ids[0]: i for i, w in enumerate(vocabulary)}
    own, other, top = defaultdict(list), defaultdict(list), defaultdict(list)
    for b, caption in enumerate(captions):
        ids = tokenizer(caption, max_length=length, padding="max_length", truncation=True).input_ids
        for position, token in enumerate(ids):
            if token not in word_ids:
                continue
            index = word_ids[token]
            kind = "colour" if vocabulary[index] in COLOURS else "shape" if vocabulary[index] in SHAPES else "background"
            sims = concepts @ torch.nn.functional.normalize(embeds[b, position], dim=-1)
            rest = torch.cat([sims[:index], sims[index + 1:]])
            own[kind].append(float(sims[index]))
            other[kind].append(float(rest.max()))
            top[kind].append(float(sims.argmax()) == index)
    print(f"{len(captions)} held-out two-object captions; cosine of a caption word with the concept embeddings")
    print("| words | count | own concept | closest other concept | own is closest |")
    print("|---|---|---|---|---|")
    for kind in ("colour", "shape", "background"):
        print(f"| {kind} | {len(own[kind])} | {np.mean(own[kind]):.2f} | {np.mean(other[kind]):.2f} "
              f"| {np.mean(top[kind]):.2f} |")


if __name__ == "__main__":
    main()
