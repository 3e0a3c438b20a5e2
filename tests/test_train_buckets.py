"""Training runs of the CLI with aspect-ratio buckets on a mixed-aspect kohya folder (tiny model, PyNative, so no
graph is compiled per bucket shape): the bucket table is logged, every step trains one bucket and all buckets are
visited; the slow check SIGKILLs a run half-way through writing a checkpoint and resumes it bit for bit.

Runs go through ``tests/reliability/train_driver.py`` (the CLI unchanged, with a kill hook chosen by environment)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm.data.synthetic import make_mixed_aspect_folder
from ldm.env import set_seed
from ldm.io.checkpoint import read_state_dict
from ldm.io.model_io import save_model
from ldm.models.diffusion import build_model_from_config
from ldm.train.state import read_train_state_meta
from ldm.util import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples/stable_diffusion_v2/train_text_to_image.py"
DRIVER = ROOT / "tests/reliability/train_driver.py"
TINY = ROOT / "configs/train/train_config_lora_tiny.yaml"
# area 32x32, sides 16..64 in steps of 8 (the tiny model's granularity is 4): 48x32 and 50x30 -> 40x24, the
# portraits -> 24x40, 32x32 -> 32x32
SIZES = [(48, 32), (50, 30), (32, 48), (30, 52), (32, 32), (34, 34)]
BUCKETS = ["--enable_bucket", "True", "--resolution", "32", "--min_bucket_reso", "16", "--max_bucket_reso", "64"]
BUCKETS += ["--bucket_reso_steps", "8"]
AUGMENT = ["--random_flip", "True", "--caption_dropout", "0.2", "--shuffle_caption", "True", "--keep_tokens", "1"]
AUGMENT += ["--caption_tag_dropout_rate", "0.2", "--gradient_accumulation_steps", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_buckets")
    set_seed(0)
    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    base = root / "base.safetensors"
    save_model(build_model_from_config(config), base, config=config)
    return {"root": root, "base": base, "data": make_mixed_aspect_folder(root / "data", SIZES)}


def _train(setup, out: Path, *args: str, env: dict | None = None):
    cmd = [sys.executable, str(DRIVER), str(SCRIPT), "--train_config", str(TINY), "--data_path", str(setup["data"])]
    cmd += ["--output_path", str(out), "--pretrained_model_path", str(setup["base"]), "--train_batch_size", "2"]
    cmd += ["--seed", "7", "--scheduler", "constant", "--warmup_steps", "0", "--mode", "1", *BUCKETS, *AUGMENT, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=900)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _logged(record: dict) -> dict:
    """A metrics record without its timing and memory (which differ between runs)."""
    return {k: v for k, v in record.items() if k not in ("step_time_s", "peak_rss_gib")}


@pytest.fixture(scope="module")
def straight(setup):
    out = setup["root"] / "straight"
    run = _train(setup, out, "--max_train_steps", "2", "--ckpt_save_interval", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run


def test_mixed_aspect_set_trains_one_bucket_per_step(straight):
    """4 micro-steps (2 updates of 2): the log shows the bucket table, each step's batch is one bucket (the
    pipeline's batching refuses mixed shapes, and metrics.jsonl names the step's bucket), all three buckets occur
    within one epoch (3 global batches: one per bucket), losses are finite."""
    out, run = straight
    table = run.stderr[run.stderr.index("aspect-ratio buckets") :]
    for line in ("24x40   0.600  2", "32x32   1.000  2", "40x24   1.667  2"):
        assert line in table, table[:400]
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 5)) and all(np.isfinite(m["loss"]) for m in metrics)
    assert {m["bucket"] for m in metrics[:3]} == {"40x24", "24x40", "32x32"}
    assert read_train_state_meta(str(out / "ckpt" / "train_state.safetensors"))["data_position"]["bucket_order"]


@pytest.mark.slow
def test_sigkill_then_resume_with_buckets_is_bit_exact(setup, straight):
    """SIGKILL half-way through writing lora-000004 (the train state of step 2 is on disk), then ``--resume True``:
    every logged loss and bucket and the final adapter equal the uninterrupted run's bit for bit. A resume with other
    bucket options is refused by name."""
    ref, _ = straight
    out = setup["root"] / "killed"
    args = ["--max_train_steps", "2", "--ckpt_save_interval", "2"]
    first = _train(setup, out, *args, env={"LDM_REL_KILL_WRITING": "lora-000004.safetensors"})
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert read_train_state_meta(str(out / "ckpt" / "train_state.safetensors"))["data_position"]["batches_done"] == 2
    other = _train(setup, out, *args, "--resume", "True", "--bucket_reso_steps", "16")
    assert other.returncode == 2 and "bucket order" in other.stderr, other.stderr[-2000:]
    second = _train(setup, out, *args, "--resume", "True")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at micro-step 2" in second.stderr
    assert [_logged(m) for m in _metrics(out)] == [_logged(m) for m in _metrics(ref)]
    name = "ckpt/lora-000004.safetensors"
    resumed, reference = read_state_dict(out / name), read_state_dict(ref / name)
    assert resumed.keys() == reference.keys()
    assert all(np.array_equal(resumed[k], reference[k]) for k in reference)
