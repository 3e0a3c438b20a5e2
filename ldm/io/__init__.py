"""Checkpoint input/output: file formats (safetensors, MindSpore ``.ckpt``, PyTorch zip/TorchScript read safely),
loading state dicts into cells with a missing/unexpected/shape report, and key maps to other naming schemes."""
