"""Load a state dict into a MindSpore cell by exact parameter name, with a missing/unexpected/shape report.

MindSpore's ``load_param_into_net(strict_load=False)`` guesses prefixes and can put ``lora_down.weight`` into a conv
called ``down``; here names must match exactly, and anything missing, unexpected or of the wrong shape is an error
unless an ``allow_*`` pattern covers it. Patterns match a whole key as an fnmatch glob or as a regular expression.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import mindspore as ms
import numpy as np
from mindspore import nn

from ldm.io.checkpoint import CheckpointError
from ldm.models.layers import assign_array, uninitialised_names

DTYPE_POLICIES = ("cast to param dtype", "require same dtype")
_SHOWN = 5


def cell_state_dict(cell: nn.Cell) -> dict[str, np.ndarray]:
    """Parameter name -> a copy of its value (``asnumpy`` on CPU aliases the live parameter memory)."""
    return {name: param.asnumpy().copy() for name, param in cell.parameters_dict().items()}


def _matches(key: str, patterns) -> bool:
    for pattern in patterns:
        if fnmatch.fnmatchcase(key, pattern):
            return True
        try:
            if re.fullmatch(pattern, key):
                return True
        except re.error:
            pass
    return False


def _listing(what: str, items: list[str]) -> str:
    more = f", ... {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {what} ({', '.join(items[:_SHOWN])}{more})"


@dataclass
class LoadReport:
    """Outcome of matching a state dict against a model; ``missing``/``unexpected``/``mismatched`` are errors."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint (..) vs model (..)"
    allowed_missing: list[str] = field(default_factory=list)
    allowed_unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} loaded"]
        for what, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mismatched", self.mismatched),
        ):
            if items:
                parts.append(_listing(what, items))
        if self.allowed_missing:
            parts.append(f"{len(self.allowed_missing)} allowed missing")
        if self.allowed_unexpected:
            parts.append(f"{len(self.allowed_unexpected)} allowed unexpected")
        return ", ".join(parts)

    def raise_if_errors(self, source: str) -> None:
        if not self.ok:
            raise CheckpointError(f"{source}: state dict does not match the model: {self.summary()}")


def check_state_dict(
    expected: dict[str, tuple],
    got: dict[str, np.ndarray],
    allow_missing=(),
    allow_unexpected=(),
) -> LoadReport:
    """Compare checkpoint arrays ``got`` with the model's ``expected`` name -> shape."""
    report = LoadReport()
    for key, shape in expected.items():
        if key not in got:
            (report.allowed_missing if _matches(key, allow_missing) else report.missing).append(key)
        elif tuple(np.shape(got[key])) != tuple(shape):
            report.mismatched.append(f"{key}: checkpoint {tuple(np.shape(got[key]))} vs model {tuple(shape)}")
        else:
            report.loaded.append(key)
    for key in got:
        if key not in expected:
            (report.allowed_unexpected if _matches(key, allow_unexpected) else report.unexpected).append(key)
    return report


def match_state_dict(
    cell: nn.Cell,
    state_dict: dict[str, np.ndarray],
    source: str = "<memory>",
    allow_missing=(),
    allow_unexpected=(),
    dtype_policy: str = "cast to param dtype",
) -> LoadReport:
    """Check ``state_dict`` against ``cell``'s parameters (names, shapes and, under ``require same dtype``, dtypes)
    without setting anything; raise CheckpointError naming ``source`` and the offending keys on any disallowed
    mismatch. Returns the report; its ``loaded`` keys are the ones to assign."""
    if dtype_policy not in DTYPE_POLICIES:
        raise ValueError(f"dtype_policy must be one of {DTYPE_POLICIES}, got {dtype_policy!r}")
    params = cell.parameters_dict()
    report = check_state_dict(
        {k: tuple(p.shape) for k, p in params.items()}, state_dict, allow_missing, allow_unexpected
    )
    report.raise_if_errors(source)
    if dtype_policy == "require same dtype":
        wrong = [
            f"{k}: checkpoint {np.asarray(state_dict[k]).dtype} vs model {params[k].dtype}"
            for k in report.loaded
            if ms.dtype_to_nptype(params[k].dtype) != np.asarray(state_dict[k]).dtype
        ]
        if wrong:
            raise CheckpointError(f"{source}: {_listing('dtype mismatches', wrong)}")
    return report


def load_state_dict_into(
    cell: nn.Cell,
    state_dict: dict[str, np.ndarray],
    source: str = "<memory>",
    allow_missing=(),
    allow_unexpected=(),
    dtype_policy: str = "cast to param dtype",
    consume: bool = False,
) -> LoadReport:
    """Set ``cell``'s parameters from ``state_dict`` by exact name; raise CheckpointError naming ``source`` and the
    offending keys on any disallowed mismatch (nothing is set then). Returns the report.

    consume: remove each array from ``state_dict`` once it is assigned, so that, for a caller that holds no other
    reference, it is freed right away and loading into an uninitialised model never holds two copies of the weights.
    Parameters left uninitialised (allowed missing) are given their initializer's values, so none stays without data.
    """
    params = cell.parameters_dict()
    report = match_state_dict(cell, state_dict, source, allow_missing, allow_unexpected, dtype_policy)
    for key in report.loaded:
        assign_array(params[key], state_dict.pop(key) if consume else state_dict[key])
    for name in uninitialised_names(cell):
        params[name].init_data()
    return report
