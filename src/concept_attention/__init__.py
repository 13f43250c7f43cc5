"""ConceptAttention for diffusers multi-modal diffusion transformers.

>>> from concept_attention import ConceptAttention
>>> with ConceptAttention(pipe, concepts=["dog", "sky"]) as ca:   # doctest: +SKIP
...     image = pipe("a dog").images[0]
>>> ca.maps["dog"].shape                                          # doctest: +SKIP
"""

from .core.maps import ConceptMaps
from .core.scoring import SPACES
from .core.session import ConceptAttention
from .explain import explain, load_image
from .generate import generate
from .loading import load_pipeline
from .video_explain import explain_video

__version__ = "0.1.0"
__all__ = [
    "ConceptAttention", "ConceptMaps", "SPACES", "explain", "explain_video", "generate", "load_image", "load_pipeline",
    "__version__",
]
