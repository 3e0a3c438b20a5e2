"""Full resume state of a training run in one safetensors file.

Tensors (trainable params, AdamW moments and step, gradient accumulators, EMA weights and count, global step, loss
scale and its counter) are the safetensors payload; everything else sits as JSON under the ``ldm_train_state``
metadata key: format version, micro-step, data position (e.g. epoch and index), the ``NoiseSampler`` state, the global
numpy and Python RNG states and any caller ``extra``. The file is written to a temp file in the same folder and
renamed over the target, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from ldm.io.checkpoint import checkpoint_write
from ldm.train.losses import NoiseSampler
from ldm.train.step import TrainStep

META_KEY = "ldm_train_state"
FORMAT_VERSION = 1


def _numpy_global_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_global_state(s: dict) -> None:
    keys = np.asarray(s["keys"], dtype=np.uint32)
    np.random.set_state((s["kind"], keys, s["pos"], s["has_gauss"], s["gauss"]))


def _python_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_random_state(s: list) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))


def save_train_state(
    path: str,
    step: TrainStep,
    sampler: NoiseSampler | None = None,
    data_position: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write everything needed to continue ``step`` exactly where it is to ``path`` (atomically)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "micro_step": step.micro_step,
        "grad_accum_steps": step.grad_accum_steps,
        "data_position": data_position or {},
        "sampler": sampler.get_state() if sampler is not None else None,
        "numpy_random": _numpy_global_state(),
        "python_random": _python_random_state(),
        "extra": extra or {},
    }
    arrays = {k: np.array(v, order="C") for k, v in step.state_arrays().items()}  # keeps 0-d arrays 0-d
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with checkpoint_write(path, "the previous state") as tmp:
        save_file(arrays, tmp, metadata={META_KEY: json.dumps(meta)})


def read_train_state_meta(path: str) -> dict[str, Any]:
    """The JSON metadata of a train-state file (without loading the tensors)."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        meta = (f.metadata() or {}).get(META_KEY)
    if meta is None:
        raise ValueError(f"{path}: not a train-state file (no {META_KEY!r} metadata)")
    return json.loads(meta)


def load_train_state(path: str, step: TrainStep, sampler: NoiseSampler | None = None) -> dict[str, Any]:
    """Restore ``step`` (and ``sampler`` and the global numpy/Python RNGs) from ``path``.

    Returns the metadata dict; ``data_position`` and ``extra`` there are for the caller to restore its data loader.
    """
    meta = read_train_state_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: train-state format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    if meta["grad_accum_steps"] != step.grad_accum_steps:
        raise ValueError(
            f"{path}: saved with grad_accum_steps={meta['grad_accum_steps']}, resuming with {step.grad_accum_steps}"
        )
    step.load_state_arrays(load_file(path), meta["micro_step"])
    if sampler is not None:
        if meta["sampler"] is None:
            raise ValueError(f"{path}: no NoiseSampler state was saved")
        sampler.set_state(meta["sampler"])
    _set_numpy_global_state(meta["numpy_random"])
    _set_python_random_state(meta["python_random"])
    return meta
