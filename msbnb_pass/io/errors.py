"""The error raised for unreadable, truncated, tampered or mismatched checkpoints: the package's one
``CheckpointError`` (``msbnb_pass.errors``), re-exported here for the readers and writers."""

from __future__ import annotations

from ..errors import CheckpointError

__all__ = ["CheckpointError"]
