"""ConceptAttention for diffusers multi-modal diffusion transformers."""
