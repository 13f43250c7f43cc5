"""``python -m concept_attention.eval`` (e.g. under ``accelerate launch``): the ``concept-attention eval`` command."""

import sys

from .cli.eval import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
