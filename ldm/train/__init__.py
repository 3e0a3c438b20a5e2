"""Training machinery: diffusion loss, compiled train step (loss scaling, accumulation, clipping, AdamW), EMA,
learning-rate schedules and exact resume state."""

from ldm.train.ema import EMA
from ldm.train.losses import DiffusionLoss, NoiseSampler, min_snr_weights
from ldm.train.lr_schedules import lr_table
from ldm.train.state import load_train_state, save_train_state
from ldm.train.step import AdamW, StepOutput, TrainStep

__all__ = [
    "EMA",
    "AdamW",
    "DiffusionLoss",
    "NoiseSampler",
    "StepOutput",
    "TrainStep",
    "load_train_state",
    "lr_table",
    "min_snr_weights",
    "save_train_state",
]
