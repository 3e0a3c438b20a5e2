"""The leaf of ``ldm.io``: the checkpoint error type and dtype helpers every reader shares (imports nothing else)."""

from __future__ import annotations

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe or does not match the model; the message names the file and key."""


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns (uint16) to float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
