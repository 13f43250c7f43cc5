"""The embedded default model: a small FLUX.1-architecture pipeline trained on synthetic scenes."""
from .build import (
    CLIP_MAX_LENGTH, DEFAULT_SIZE, LOCAL_BIAS, LOCAL_HEADS, MAX_SEQUENCE_LENGTH, VOCAB_WORDS, assemble_pipeline,
    build_clip_text_model, build_clip_tokenizer, build_pipeline, build_scheduler, build_t5_encoder,
    build_t5_tokenizer, build_transformer, build_vae, finalize_pipeline, set_local_position_bias,
)

__all__ = [
    "CLIP_MAX_LENGTH", "DEFAULT_SIZE", "LOCAL_BIAS", "LOCAL_HEADS", "MAX_SEQUENCE_LENGTH", "VOCAB_WORDS", "assemble_pipeline",
    "build_clip_text_model", "build_clip_tokenizer", "build_pipeline", "build_scheduler", "build_t5_encoder",
    "build_t5_tokenizer", "build_transformer", "build_vae", "finalize_pipeline", "set_local_position_bias",
]
