"""Batch seeds of text_to_image: by default every prompt reuses the same seeds (prompts compared on equal noise);
``--seed_per_prompt True`` gives every batch of every prompt its own seed, as sample sets for FID need."""

from __future__ import annotations

from ldm.generate import batch_seed
from ldm.generate_options import GenerateOptions


def _seeds(job: GenerateOptions) -> list[int]:
    return [batch_seed(job, k, i) for k in range(len(job.prompts)) for i in range(job.n_iter)]


def test_default_reuses_seeds_across_prompts():
    job = GenerateOptions(prompts=["a", "b", "c"], n_iter=2, seed=42)
    assert _seeds(job) == [42, 43, 42, 43, 42, 43]


def test_seed_per_prompt_gives_every_batch_its_own_seed():
    job = GenerateOptions(prompts=["a", "b", "c"], n_iter=2, seed=42, seed_per_prompt=True)
    assert _seeds(job) == [42, 43, 44, 45, 46, 47]
