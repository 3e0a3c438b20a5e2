"""Evaluation metrics: FID/KID with the TF Inception network and CLIP score."""
