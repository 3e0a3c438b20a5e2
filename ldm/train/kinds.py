"""Vocabularies of training options that the option parser validates before MindSpore is imported."""

LOSS_SCALERS = ("none", "static", "dynamic")
JIT_LEVELS = ("O0", "O1", "O2")
