"""Stable Diffusion 1.x/2.x latent diffusion, LoRA fine-tuning, sampling and evaluation in MindSpore.

Importing the package applies the CPU defaults of :mod:`ldm.env` (oneDNN ISA, numpy<2 check) before MindSpore is
loaded, so entry points only need to import ``ldm`` first.
"""

from ldm.env import apply_process_defaults

apply_process_defaults()

__version__ = "0.1.0"
