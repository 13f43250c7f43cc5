"""The package version (no imports: the CLI reads it for --version without loading torch)."""

__version__ = "0.2.0"
