"""Training machinery: diffusion loss, train step (compiled in graph mode; loss scaling, accumulation, clipping,
AdamW), EMA, learning-rate schedules and exact resume state.

Names are resolved lazily, so the option parser (:mod:`ldm.train.options`) runs without starting MindSpore.
"""

from __future__ import annotations

import importlib

_OWNER = {
    "EMA": "ema",
    "AdamW": "step",
    "DiffusionLoss": "losses",
    "NoiseSampler": "losses",
    "StepOutput": "step",
    "TrainStep": "step",
    "load_train_state": "state",
    "lr_table": "lr_schedules",
    "min_snr_weights": "losses",
    "save_train_state": "state",
}
__all__ = sorted(_OWNER)


def __getattr__(name: str):
    if name not in _OWNER:
        raise AttributeError(f"module 'ldm.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ldm.train.{_OWNER[name]}"), name)
