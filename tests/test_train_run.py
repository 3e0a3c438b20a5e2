"""End-to-end training runs of the CLI on the tiny model: the loss falls, frozen weights stay put, a SIGKILLed run
resumes bit-exactly, a crash mid-write never leaves a half-written checkpoint, and a corrupt image is skipped.

Every run is a subprocess of ``DRIVER`` (below), which runs ``train_text_to_image.py`` unchanged via ``runpy`` after
setting test hooks from environment variables: the number of CPU threads (speed only), SIGKILL right after the train
state of a given step was written, and a digest of every frozen parameter after training. The runs use the CLI's
default compile cache, in the test session's folder (``conftest.py``): a run with the options of an earlier one
reloads its graphs (``tests/test_compile_cache.py`` shows that a reloaded step trains exactly as the compiling one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ldm.data.synthetic import make_shapes_dataset
from ldm.env import set_seed
from ldm.io.checkpoint import read_metadata, read_state_dict
from ldm.io.model_io import save_model
from ldm.lora.adapter import read_adapter
from ldm.lora.network import load_adapter
from ldm.models.diffusion import build_model_from_config
from ldm.train.state import read_train_state_meta
from ldm.train.trainer import TrainOptions, build_trainable_model
from ldm.util import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples/stable_diffusion_v2/train_text_to_image.py"
TINY = ROOT / "configs/train/train_config_lora_tiny.yaml"
STEPS, KILL_AT = 20, 4
TIMEOUT = 600

DRIVER = textwrap.dedent(
    '''
    """Run the training CLI in this process with the test hooks of tests/test_train_run.py."""
    import hashlib, json, os, runpy, signal, sys

    import ldm  # noqa: F401  (before mindspore)
    import ldm.env
    import ldm.train.trainer as trainer

    env = os.environ
    init_env = ldm.env.init_env

    def init_env_for_tests(*args, **kwargs):
        return init_env(*args, **kwargs, threads=int(env.get("LDM_TEST_THREADS", "2")))

    ldm.env.init_env = init_env_for_tests

    if env.get("LDM_TEST_KILL_AFTER_STEP"):
        save_train_state = trainer.save_train_state

        def save_then_die(path, step, sampler=None, data_position=None, extra=None):
            save_train_state(path, step, sampler, data_position=data_position, extra=extra)
            if data_position["batches_done"] == int(env["LDM_TEST_KILL_AFTER_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.save_train_state = save_then_die

    if env.get("LDM_TEST_FROZEN_DIGEST"):
        built = []
        build = trainer.build_trainable_model
        run = trainer.run_training

        def keep_model(*args, **kwargs):
            model, params = build(*args, **kwargs)
            built.append(model)
            return model, params

        def run_and_digest(*args, **kwargs):
            summary = run(*args, **kwargs)
            digests = {
                p.name: hashlib.sha256(p.asnumpy().tobytes()).hexdigest()
                for p in built[0].get_parameters()
                if not p.requires_grad
            }
            with open(env["LDM_TEST_FROZEN_DIGEST"], "w", encoding="utf-8") as f:
                json.dump(digests, f)
            return summary

        trainer.build_trainable_model = keep_model
        trainer.run_training = run_and_digest

    script, *argv = sys.argv[1:]
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
    '''
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Base model (saved once, shared by every run), an 8-image set and the driver script."""
    root = tmp_path_factory.mktemp("train_run")
    set_seed(0)
    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    base = root / "base.safetensors"
    save_model(build_model_from_config(config), base, config=config)
    data = make_shapes_dataset(root / "data", count=8, size=32)
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    return {"root": root, "base": base, "data": data, "driver": driver}


def train(setup, out: Path, *args: str, env: dict | None = None, data: Path | None = None):
    """One CLI run with a fixed recipe: batch 2, constant lr 1e-2 (the loss falls within 20 steps), no warmup."""
    cmd = [sys.executable, str(setup["driver"]), str(SCRIPT), "--train_config", str(TINY)]
    cmd += ["--data_path", str(data or setup["data"]), "--output_path", str(out)]
    cmd += ["--pretrained_model_path", str(setup["base"]), "--train_batch_size", "2", "--seed", "7"]
    cmd += ["--scheduler", "constant", "--warmup_steps", "0", "--start_learning_rate", "1e-2", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=TIMEOUT
    )


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(setup):
    """The reference run: STEPS steps, a checkpoint every KILL_AT steps, digests of the frozen parameters."""
    out = setup["root"] / "straight"
    digest = setup["root"] / "frozen.json"
    start = time.perf_counter()
    run = train(
        setup,
        out,
        "--max_train_steps",
        str(STEPS),
        "--ckpt_save_interval",
        str(KILL_AT),
        env={"LDM_TEST_FROZEN_DIGEST": str(digest)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"straight run of {STEPS} steps: {time.perf_counter() - start:.1f} s")
    return out, json.loads(digest.read_text())


def test_loss_falls_and_only_lora_changes(setup, straight):
    out, frozen_digests = straight
    losses = _losses(out)
    assert len(losses) == STEPS and all(np.isfinite(losses))
    # the per-step loss is noisy (random timesteps); the means of the first and last five steps are far apart
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    print(f"mean loss of steps 1-5: {first:.4f}, of steps {STEPS - 4}-{STEPS}: {last:.4f}")
    assert last < 0.9 * first, losses
    assert (out / "loss.png").stat().st_size > 0

    adapter = out / "ckpt" / f"lora-{STEPS:06d}.safetensors"
    state = read_state_dict(adapter)
    assert state and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in state)
    assert adapter.stat().st_size < 1_000_000
    header = json.loads(read_metadata(adapter)["ldm_lora"])
    assert header["family"] == "sd2" and header["rank"] == 4
    assert any(np.abs(v).max() > 0 for k, v in state.items() if k.endswith(".lora_up.weight"))  # it trained

    # the frozen parameters after the run are bitwise the base file's (the others are LoRA's constant lora_mult)
    base = read_state_dict(setup["base"])
    assert all(".lora_" in k for k in frozen_digests.keys() - base.keys())
    assert {k: frozen_digests[k] for k in base} == {
        k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in base.items()
    }
    # the optimizer state covers the LoRA parameters only; the run wrote no base weights anywhere
    state_keys = set(read_state_dict(out / "ckpt" / "train_state.safetensors"))
    assert not state_keys & set(base)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    adapters = [f"ckpt/lora-{s:06d}.safetensors" for s in range(KILL_AT, STEPS + 1, KILL_AT)]
    assert written == sorted(["loss.png", "metrics.jsonl", "ckpt/train_state.safetensors", *adapters])

    # base + adapter loads back with every non-LoRA parameter equal to the base file
    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    opts = TrainOptions(use_lora=True, lora_rank=4, pretrained_model_path=str(setup["base"]))
    model, _ = build_trainable_model(opts, config)  # loads the base, then injects LoRA
    load_adapter(model, read_adapter(adapter))
    state = {k: v for k, v in state.items() if not k.endswith(".alpha")}  # alphas are layer settings, not params
    params = {p.name: p.asnumpy() for p in model.get_parameters()}
    assert set(params) >= set(base) | set(state)
    assert all(k.endswith(".lora_mult") for k in set(params) - set(base) - set(state))
    assert all(np.array_equal(params[k], v) for k, v in base.items())
    assert all(np.array_equal(params[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def killed(setup):
    """KILL_AT steps, SIGKILL right after that step's checkpoint, then ``--resume True`` to 2 * KILL_AT.

    Its data is the straight run's plus a corrupt PNG listed last: the scan drops it, which leaves the same records
    in the same order, so the comparison with the straight run still holds.
    """
    data = setup["root"] / "data_with_corrupt"
    shutil.copytree(setup["data"], data)
    bad = data / "images" / "broken.png"
    bad.write_bytes(b"\x89PNG but not really" + bytes(range(256)))
    with open(data / "img_txt.csv", "a", encoding="utf-8") as f:
        f.write("images/broken.png,a broken image\n")
    out = setup["root"] / "killed"
    args = ["--max_train_steps", str(2 * KILL_AT), "--ckpt_save_interval", str(KILL_AT)]
    first = train(setup, out, *args, env={"LDM_TEST_KILL_AFTER_STEP": str(KILL_AT)}, data=data)
    listing = sorted(p.name for p in (out / "ckpt").iterdir())
    meta = read_train_state_meta(str(out / "ckpt" / "train_state.safetensors"))
    losses = _losses(out)
    second = train(setup, out, *args, "--resume", "True", data=data)
    return {"out": out, "bad": bad, "runs": (first, second), "listing": listing, "meta": meta, "losses": losses}


def test_sigkill_then_resume_is_bit_exact(straight, killed):
    """The resumed adapter and every logged loss equal the straight run's at step 2 * KILL_AT bit for bit (same CPU
    kernels, same data order, restored optimizer moments and noise stream). The straight run is longer, which
    changes nothing before step 2 * KILL_AT because the learning rate is constant and the data order does not
    depend on the run length."""
    ref_out, _ = straight
    first, second = killed["runs"]
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    # only complete files under their final names: no temp files from the atomic writes are left
    assert killed["listing"] == [f"lora-{KILL_AT:06d}.safetensors", "train_state.safetensors"]
    assert killed["meta"]["data_position"] == {"batches_done": KILL_AT}
    assert len(killed["losses"]) == KILL_AT

    assert second.returncode == 0, second.stderr[-3000:]
    assert f"at micro-step {KILL_AT}" in second.stderr
    out = killed["out"]
    assert _losses(out) == _losses(ref_out)[: 2 * KILL_AT]
    name = f"lora-{2 * KILL_AT:06d}.safetensors"
    resumed, reference = read_state_dict(out / "ckpt" / name), read_state_dict(ref_out / "ckpt" / name)
    assert resumed.keys() == reference.keys()
    assert all(np.array_equal(resumed[k], reference[k]) for k in reference)


def test_corrupt_image_is_named_and_skipped(killed):
    """Both runs of ``killed`` warn, naming the corrupt file, and train on the other images."""
    for run in killed["runs"]:
        warnings = [line for line in run.stderr.splitlines() if "skipped 1 of 9 images" in line]
        assert warnings and all(str(killed["bad"]) in w for w in warnings), run.stderr[-3000:]
    assert killed["runs"][1].returncode == 0 and len(_losses(killed["out"])) == 2 * KILL_AT


KILL_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import ldm  # noqa: F401
    import ldm.train.state as state

    class Step:  # what save_train_state reads from a TrainStep
        micro_step, grad_accum_steps, value = 0, 1, 1.0

        def state_arrays(self):
            return {"w": np.full(4096, self.value, np.float32)}

    step = Step()
    state.save_train_state(sys.argv[1], step, data_position={"batches_done": 1})
    save_file = state.save_file

    def write_half_then_die(arrays, filename, metadata=None):
        save_file(arrays, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    state.save_file = write_half_then_die
    step.value = 2.0
    state.save_train_state(sys.argv[1], step, data_position={"batches_done": 2})
    """
)


def test_kill_mid_write_keeps_previous_train_state(tmp_path):
    """SIGKILL while the second state is half written: the file under the real name is still the first, complete
    one (a stray hidden temp file may remain, which resume never reads)."""
    path = tmp_path / "ckpt" / "train_state.safetensors"
    script = tmp_path / "kill_mid_write.py"
    script.write_text(KILL_MID_WRITE)
    run = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert read_train_state_meta(str(path))["data_position"] == {"batches_done": 1}
    assert np.array_equal(read_state_dict(path)["w"], np.full(4096, 1.0, np.float32))
    others = [p.name for p in path.parent.iterdir() if p != path]
    assert len(others) == 1 and others[0].startswith(".train_state.") and ".tmp" in others[0]
