"""Stable Diffusion networks with original-LDM (CompVis/Stability) parameter names."""
