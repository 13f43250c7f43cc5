"""File types the front ends recognise (no heavy imports: the command line reads these before loading torch)."""

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv", ".m4v")
"""File types read as videos (GIF with Pillow, the others with imageio's ffmpeg plugin)."""
