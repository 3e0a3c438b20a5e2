"""The leaf of ``ldm.io``: the checkpoint error types and dtype helpers every reader shares (imports nothing else)."""

from __future__ import annotations

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe or does not match the model; the message names the file and key."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, folder missing or read-only); the previous file is unchanged.
    Also an ``OSError``, so callers handling I/O errors keep catching it."""


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns (uint16) to float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
