import sys
from pathlib import Path

# The test modules here import their shared helpers as ``helpers`` (tests run with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).parent))
