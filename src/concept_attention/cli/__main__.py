"""``python -m concept_attention.cli``: the ``concept-attention`` command."""

import sys

from . import main

sys.exit(main())
