"""Loss scalers for the functional train step, and their checkpointable state.

MindSpore's functional ``amp.StaticLossScaler`` / ``amp.DynamicLossScaler`` work in graph mode on CPU, unlike
``nn.TrainOneStepWithLossScaleCell`` (it reaches for the Ascend-only NPUGetFloatStatusV2). ``none`` is a static
scale of 1: gradients are still checked for inf/nan so a non-finite step is skipped in every mode.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, amp

from ldm.train.kinds import LOSS_SCALERS


def make_loss_scaler(
    kind: str = "none", init_scale: float = 2.0**16, scale_factor: int = 2, scale_window: int = 1000
) -> amp.LossScaler:
    """``none`` | ``static`` (fixed ``init_scale``) | ``dynamic`` (divide by ``scale_factor`` on overflow, multiply
    after ``scale_window`` finite updates; never below 1)."""
    if kind == "none":
        return amp.StaticLossScaler(1.0)
    if kind == "static":
        return amp.StaticLossScaler(float(init_scale))
    if kind == "dynamic":
        return amp.DynamicLossScaler(float(init_scale), int(scale_factor), int(scale_window))
    raise ValueError(f"loss scaler must be one of {LOSS_SCALERS}, got {kind!r}")


def scaler_parameters(scaler: amp.LossScaler) -> list:
    """The scaler's Parameters (``scale_value`` and, for dynamic scaling, ``counter``)."""
    return [scaler.scale_value, scaler.counter] if isinstance(scaler, amp.DynamicLossScaler) else [scaler.scale_value]


def scaler_state(scaler: amp.LossScaler) -> dict[str, np.ndarray]:
    """The scaler's mutable state as arrays: ``scale_value`` and, for dynamic scaling, the finite-step ``counter``."""
    state = {"scale_value": scaler.scale_value.asnumpy().copy()}
    if isinstance(scaler, amp.DynamicLossScaler):
        state["counter"] = scaler.counter.asnumpy().copy()
    return state


def load_scaler_state(scaler: amp.LossScaler, state: dict[str, np.ndarray]) -> None:
    scaler.scale_value.set_data(Tensor(np.asarray(state["scale_value"], dtype=np.float32)))
    if isinstance(scaler, amp.DynamicLossScaler):
        scaler.counter.set_data(Tensor(np.asarray(state["counter"], dtype=np.int32)))
