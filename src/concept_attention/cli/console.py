"""What the command line prints: the library's own warnings as one line each, nothing from the libraries
underneath unless ``--verbose`` (no torch import here)."""

from __future__ import annotations

import os
import sys


def quiet_console(command: str, verbose: bool = False) -> None:
    """The library's own warnings as one line each; other libraries' warnings and logs only with ``--verbose``."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(name, "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' weight-loading bars
        import logging

        logging.basicConfig(level=logging.ERROR)  # other libraries' log warnings (e.g. torchao's at import)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if verbose or "concept_attention" in str(filename):
            print(f"concept-attention {command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def silence_loading(verbose: bool = False) -> None:
    """No diffusers progress bars while a pipeline loads (the command shows its own status line)."""
    if not verbose:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        import logging

        logging.getLogger("torch").setLevel(logging.ERROR)  # torch's own log handler (e.g. pytree notices)
