"""Learning-rate schedules indexed by optimizer update (not micro-step), as a per-update table.

The formulas are diffusers' ``get_scheduler`` ones (``optimization.py``) so a run matches a diffusers run update for
update: linear warmup from 0 (``lr * s / warmup``, so update 0 uses lr 0 when warmup > 0), then

- ``constant``: ``lr``;
- ``linear``: ``end_lr + (lr - end_lr) * (total - s) / (total - warmup)``;
- ``cosine``: ``end_lr + (lr - end_lr) * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))``.

The table is computed in float64 and stored as float32; ``TrainStep`` looks it up in the graph at its global step
(clamped to the last entry, so training past ``total_steps`` keeps the final value).
"""

from __future__ import annotations

import numpy as np

SCHEDULES = ("constant", "linear", "cosine")


def lr_table(
    kind: str,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    end_lr: float = 0.0,
) -> np.ndarray:
    """Learning rate of optimizer updates 0 .. total_steps-1, float32 [total_steps]."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    s = np.arange(total_steps, dtype=np.float64)
    progress = np.clip((s - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
    if kind == "constant":
        values = np.full_like(s, lr)
    else:
        decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + np.cos(np.pi * progress))
        values = end_lr + (lr - end_lr) * decay
    warm = s < warmup_steps
    values[warm] = lr * s[warm] / max(1, warmup_steps)
    return values.astype(np.float32)
