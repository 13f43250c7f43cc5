"""ConceptAttention for diffusers multi-modal diffusion transformers.

>>> from concept_attention import ConceptAttention
>>> with ConceptAttention(pipe, concepts=["dog", "sky"]) as ca:   # doctest: +SKIP
...     image = pipe("a dog").images[0]
>>> ca.maps["dog"].shape                                          # doctest: +SKIP
"""

from .core.maps import ConceptMaps
from .core.scoring import SPACES
from .core.session import ConceptAttention

__version__ = "0.1.0"
__all__ = ["ConceptAttention", "ConceptMaps", "SPACES", "__version__"]
