#!/usr/bin/env python
"""Diagnostic: does the embedded model's frozen T5 keep each caption word recognisable as its concept?

ConceptAttention encodes a concept alone ("red") and the prompt as a whole caption. If the text
encoder blurred the words of a caption together, no attention downstream could tie a concept to its
object. For held-out two-object captions, each colour, shape and background word's embedding (as the
pipeline encodes the caption) is compared by cosine similarity with every concept embedding (as
ConceptAttention encodes concepts): the word's own concept, the closest other concept, and how often
the own concept is the closest.

  python scripts/probe_text_encoder.py [--model DIR] [--captions 50]
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="exported pipeline directory (default: the shipped model)")
    ap.add_argument("--captions", type=int, default=50)
    args = ap.parse_args()

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
