"""The public API in one module: importing it registers every model family and the picture and file views
of :class:`ConceptMaps` (``concept_attention`` re-exports these names)."""

from . import adapters, saving, viz  # noqa: F401  (registration: families, ConceptMaps.save/load/figure/...)
from .core.maps import ConceptMaps
from .core.scoring import SPACES
from .core.session import ConceptAttention
from .explanation import explain, load_image
from .generation import generate
from .loading import load_pipeline
from .video_explanation import explain_video

__all__ = ["ConceptAttention", "ConceptMaps", "SPACES", "explain", "explain_video", "generate", "load_image",
           "load_pipeline"]
