"""Errors of the method package."""

from __future__ import annotations


class BundleError(ValueError):
    """A bundle part is missing or does not match; the message names the part and what to do."""
