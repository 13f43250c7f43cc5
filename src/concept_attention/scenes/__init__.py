"""Synthetic scenes with known masks (training data and ground truth of the embedded model)."""
from .render import (
    BACKGROUNDS, CAPTION_WORDS, COLOURS, EXCLUDED_PAIRS, SHAPES, SIZE, Scene, SceneObject,
    caption_variants, partial_captions, render_batch, render_scene, single_word_captions,
    training_caption,
)

__all__ = [
    "BACKGROUNDS", "CAPTION_WORDS", "COLOURS", "EXCLUDED_PAIRS", "SHAPES", "SIZE", "Scene", "SceneObject",
    "caption_variants", "partial_captions", "render_batch", "render_scene", "single_word_captions",
    "training_caption",
]
