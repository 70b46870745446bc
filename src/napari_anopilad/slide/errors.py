"""The error that every slide-reading failure raises."""

from __future__ import annotations


class SlideError(ValueError):
    """A slide cannot be opened or read; the one-line message names the file and what to do."""
