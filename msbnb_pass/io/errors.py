"""The error raised for unreadable, truncated, tampered or mismatched checkpoints."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be used as it is: the message names the file, the tensor
    and what was expected."""
