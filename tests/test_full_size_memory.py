"""Peak memory of full-size SD2-base jobs at 512px through the CLIs, as users run them (``make test-slow``).

Each job runs in its own process; its peak RSS comes from ``wait4`` and must stay under the bound stated below.
PyTorch's figures for the same jobs on the same machine are 7.68 GiB (diffusers + peft, a batch-1 LoRA step with
VAE and text encoder) and 6.48 GiB (one 512px image); the bounds are those targets, 7.7 and 6.5 GiB. Measured
(``benchmarks/README.md``): training 7.54 GiB over these two steps (7.15 GiB in the first; the second step's VAE
encode finds the memory pool fragmented), so the training margin is 0.16 GiB (2 %); generation 6.06 GiB, a
margin of 0.44 GiB. A regression that stores attention scores again (9.6 GiB) or keeps the text encoder during
sampling fails them. Random weights (no SD weights can be downloaded); memory does not depend on their values. The
models are initialised in place, not loaded from a file: loading a 5 GB checkpoint peaks at 10.45 GiB today (the
built model and the read state dict together), which these bounds do not cover. Each job takes many minutes on a
2-core CPU.
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.data.synthetic import make_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
TRAIN_BOUND_GIB = 7.7  # measured 7.54 GiB (v2 recipe: PyNative, recompute, memory-efficient attention)
GENERATE_BOUND_GIB = 6.5  # measured 6.06 GiB (--mode 1 --attention_slice_size 1, text encoder released)


def _peak_rss_gib(cmd: list[str]) -> float:
    """Run ``cmd`` from the repo root; return its peak RSS in GiB (a failing run fails the test)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, out[-3000:]
    return usage.ru_maxrss / 2**20


@pytest.mark.slow
def test_lora_training_step_fits(tmp_path):
    data = make_shapes_dataset(tmp_path / "data", count=2, size=512)
    peak = _peak_rss_gib(
        [
            sys.executable,
            "examples/stable_diffusion_v2/train_text_to_image.py",
            "--train_config",
            "configs/train/train_config_lora_v2.yaml",
            "--data_path",
            str(data),
            "--output_path",
            str(tmp_path / "out"),
            "--train_batch_size",
            "1",
            "--max_train_steps",
            "2",
            "--use_ema",
            "False",
        ]
    )
    assert peak <= TRAIN_BOUND_GIB, f"peak RSS {peak:.2f} GiB > {TRAIN_BOUND_GIB} GiB"


@pytest.mark.slow
def test_512px_generation_fits(tmp_path):
    peak = _peak_rss_gib(
        [
            sys.executable,
            "examples/stable_diffusion_v2/text_to_image.py",
            "--version",
            "2.0",
            "--prompt",
            "a red fox",
            "--H",
            "512",
            "--W",
            "512",
            "--sampling_steps",
            "2",
            "--n_iter",
            "1",
            "--mode",
            "1",
            "--attention_slice_size",
            "1",
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    assert peak <= GENERATE_BOUND_GIB, f"peak RSS {peak:.2f} GiB > {GENERATE_BOUND_GIB} GiB"
