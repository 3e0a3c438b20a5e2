"""Exponential moving average of the trainable parameters.

Decay follows mindone's ``ldm/modules/train/ema.py`` (the MindSpore SD peer), ``d = decay * (1 - exp(-n / warmup))``
with ``n`` the number of EMA updates so far including this one; ``warmup_steps=0`` gives a constant ``decay``. The
warmup lets the average track the weights closely early on (d is ~0 at n=1), as diffusers' ``(1 + n) / (10 + n)``
does, but with a tunable horizon. ``TrainStep`` calls ``construct(apply)`` inside its compiled update with
``apply`` false for overflow-skipped updates, which then change neither the average nor ``n``.
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ldm.models.layers import assign_array


def ema_decay(n: int, decay: float, warmup_steps: float) -> float:
    """Host-side reference of the decay used for the n-th update (n >= 1)."""
    return decay if warmup_steps <= 0 else decay * (1.0 - math.exp(-n / warmup_steps))


def _ema_one(d, apply, avg, param):
    new = avg * d + param * (1.0 - d)
    return ops.assign(avg, ops.select(apply, new, avg))


class EMA(nn.Cell):
    """EMA copies (``ema.<name>``) of ``params``; ``swap_in``/``swap_out`` exchange them with the live weights."""

    def __init__(self, params: list[Parameter], decay: float = 0.9999, warmup_steps: float = 2000.0):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup_steps = float(warmup_steps)
        self.params = ParameterTuple(params)
        self.ema_params = self.params.clone(prefix="ema", init="same")
        for p in self.ema_params:
            p.requires_grad = False
        self.updates = Parameter(Tensor(0, ms.int32), name="ema_updates", requires_grad=False)
        self.hyper_map = ops.HyperMap()
        self._backup: list[np.ndarray] | None = None

    def construct(self, apply):
        n = self.updates + apply.astype(ms.int32)
        ops.assign(self.updates, n)
        d = ops.scalar_to_tensor(self.decay, ms.float32)
        if self.warmup_steps > 0:
            d = d * (1.0 - ops.exp(-n.astype(ms.float32) / self.warmup_steps))
        return self.hyper_map(ops.partial(_ema_one, d, apply), self.ema_params, self.params)

    def swap_in(self) -> None:
        """Put the EMA weights into the live parameters (for evaluation or saving); undo with ``swap_out``."""
        if self._backup is not None:
            raise RuntimeError("EMA weights are already swapped in")
        self._backup = [p.asnumpy().copy() for p in self.params]
        for p, e in zip(self.params, self.ema_params):
            assign_array(p, e.asnumpy().copy())

    def swap_out(self) -> None:
        """Restore the training weights saved by ``swap_in``."""
        if self._backup is None:
            raise RuntimeError("EMA weights are not swapped in")
        for p, b in zip(self.params, self._backup):
            assign_array(p, b)
        self._backup = None
