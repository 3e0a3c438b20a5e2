"""Checkpoint input/output: file formats (safetensors, MindSpore ``.ckpt``, PyTorch zip/TorchScript read safely),
loading state dicts into cells with a missing/unexpected/shape report, key maps to other naming schemes, and the one
model-config resolver (:mod:`ldm.io.model_config`). :mod:`ldm.io.errors` is the leaf every reader imports."""
