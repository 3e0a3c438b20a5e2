"""Data-parallel training under ``msrun`` (2 CPU workers, mccl): 2 ranks x batch B train the same adapter as one
process with batch 2B, and only rank 0 writes files.

Why the two runs must agree: ``ShardedSampler`` gives rank r the samples ``order[r::2]`` of each epoch, so step k of
rank r holds ``order[2kB + r + 2j]`` (j < B) and the two ranks together hold exactly ``order[2kB:2(k+1)B]``, the
single process's step-k batch. The trainer draws the noise of the whole global batch from one stream on every rank
and keeps rows ``r::2``, so every sample also gets the same timestep and noise in both runs. The loss is a per-sample
mean, so the mean of the two ranks' gradients (``DistributedGradReducer``, ``gradients_mean``) is the full-batch
gradient; only the float summation order differs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ldm.data.synthetic import make_shapes_dataset
from ldm.env import set_seed
from ldm.io.checkpoint import read_state_dict
from ldm.io.model_io import save_model
from ldm.models.diffusion import build_model_from_config
from ldm.util import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples/stable_diffusion_v2/train_text_to_image.py"
TINY = ROOT / "configs/train/train_config_lora_tiny.yaml"
MSRUN = ROOT / ".venv/bin/msrun"
STEPS, BATCH = 4, 1
TIMEOUT = 600
# Tolerances (relative L2 norm of the difference). The runs differ only in float summation order (batch mean inside
# one graph vs the mean of two AllReduced per-rank means): the logged gradient norms agree to ~1e-7 and the AdamW
# first moments, which are linear in the gradients, to ~1e-5 after 4 steps (bound 1e-4). The adapter itself is
# compared more loosely: AdamW moves every element by about lr whatever the gradient's size, so an element whose
# gradient is at rounding level in one run can step the other way in the other run. lora_up starts at zero and is
# made of such steps only (observed 6e-4, bound 5e-3); lora_down starts from the same random init (observed 5e-6,
# bound 1e-4).
RTOL = {"grad_norm": 1e-5, "adam_m": 1e-4, "lora_up": 5e-3, "lora_down": 1e-4}

# Runs the CLI unchanged via runpy with a fixed number of CPU kernel threads per process (speed only).
DRIVER = textwrap.dedent(
    """
    import os, runpy, sys

    import ldm  # noqa: F401  (before mindspore)
    import ldm.env

    init_env = ldm.env.init_env

    def init_env_for_tests(*args, **kwargs):
        return init_env(*args, **kwargs, threads=int(os.environ.get("LDM_TEST_THREADS", "1")))

    ldm.env.init_env = init_env_for_tests
    script, *argv = sys.argv[1:]
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(root: Path, out: Path, batch: int) -> list[str]:
    return [
        *["--train_config", str(TINY), "--data_path", str(root / "data"), "--output_path", str(out)],
        *["--pretrained_model_path", str(root / "base.safetensors"), "--max_train_steps", str(STEPS)],
        *["--train_batch_size", str(batch), "--scheduler", "constant", "--warmup_steps", "0", "--seed", "11"],
    ]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not MSRUN.exists(), reason=f"{MSRUN} not installed")
def test_two_ranks_match_one_process_with_double_batch(tmp_path):
    set_seed(0)
    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    save_model(build_model_from_config(config), tmp_path / "base.safetensors", config=config)
    make_shapes_dataset(tmp_path / "data", count=8, size=32)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PATH": f"{ROOT / '.venv/bin'}{os.pathsep}{os.environ.get('PATH', '')}"}

    single = tmp_path / "single"
    cmd = [sys.executable, str(driver), str(SCRIPT), *_args(tmp_path, single, 2 * BATCH)]
    run = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**env, "LDM_TEST_THREADS": "2"}, timeout=TIMEOUT
    )
    assert run.returncode == 0, run.stderr[-3000:]

    par, logs = tmp_path / "parallel", tmp_path / "msrun_log"
    cmd = [str(MSRUN), "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}", "--join=True"]
    cmd += [f"--log_dir={logs}", str(driver), str(SCRIPT), *_args(tmp_path, par, BATCH), "--use_parallel", "True"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=TIMEOUT)
    worker_logs = {p.name: p.read_text(errors="replace") for p in sorted(logs.glob("worker_*.log"))}
    detail = run.stdout[-2000:] + run.stderr[-2000:] + "".join(t[-2000:] for t in worker_logs.values())
    assert run.returncode == 0, detail
    assert set(worker_logs) == {"worker_0.log", "worker_1.log"}, detail
    assert all(f"steps: {STEPS}" in text for text in worker_logs.values()), detail  # both ranks finished
    assert "rank 1/2" in worker_logs["worker_1.log"], detail  # rank 1 read its own shard

    # only rank 0 wrote: one metrics line per step (not two), and the output folder holds rank 0's files only
    written = sorted(p.relative_to(par).as_posix() for p in par.rglob("*") if p.is_file())
    adapter = f"ckpt/lora-{STEPS:06d}.safetensors"
    assert written == sorted(["loss.png", "metrics.jsonl", "ckpt/train_state.safetensors", adapter])
    par_metrics, single_metrics = _metrics(par), _metrics(single)
    assert [m["step"] for m in par_metrics] == list(range(1, STEPS + 1))

    # rank 0 logs the norm of the rank-averaged gradient: it is the single process's full-batch gradient norm
    np.testing.assert_allclose(
        [m["grad_norm"] for m in par_metrics], [m["grad_norm"] for m in single_metrics], rtol=RTOL["grad_norm"]
    )
    ours, ref = read_state_dict(par / adapter), read_state_dict(single / adapter)
    assert ours.keys() == ref.keys()
    ours_m = _prefixed(read_state_dict(par / "ckpt/train_state.safetensors"), "adam_m.")
    ref_m = _prefixed(read_state_dict(single / "ckpt/train_state.safetensors"), "adam_m.")
    assert ours_m.keys() == ref_m.keys() == ref.keys()
    for kind, a, b in [("adam_m", ours_m, ref_m), ("lora_up", ours, ref), ("lora_down", ours, ref)]:
        keys = [k for k in b if kind == "adam_m" or f".{kind}." in k]
        diff = np.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in keys))
        size = np.sqrt(sum(float(np.sum(b[k] ** 2)) for k in keys))
        print(f"{kind}: relative difference {diff / size:.2g} over {len(keys)} tensors (bound {RTOL[kind]:g})")
        assert keys and size > 0 and diff <= RTOL[kind] * size, kind


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
