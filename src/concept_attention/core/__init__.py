"""Model-independent core: the session, the scoring math and the result object."""

from .maps import ConceptMaps
from .scoring import SPACES, ConceptGroups

__all__ = ["ConceptMaps", "ConceptGroups", "SPACES"]
