"""The error type of bad input, importable without torch (the command line uses it before any
job module is loaded); :mod:`bilevel.problem` re-exports it with its subclasses."""

from __future__ import annotations

__all__ = ["BilevelError"]


class BilevelError(ValueError):
    """Bad input or a problem that violates the assumptions of the method."""
