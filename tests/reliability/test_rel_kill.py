"""Reliability: SIGKILL at every step of a checkpoint write, disk full while writing, and forced NaN losses.

Cheap design. A training process costs a graph compile (~30-60 s on 2 cores), so each kill point is not a training
run of its own:

* Checkpoint-writer kills: the trainer's own ``_checkpoint`` (weights file, then train state; each a temp file,
  fsync, rename) runs in a forked child of this test process with stand-in weights and optimizer state, and the
  child SIGKILLs itself at one named point: before/after each ``mkstemp``, half-way through and after each
  ``save_file``, after each ``fsync`` and ``rename`` (13 points with the metrics line and the loss plot). A fork
  costs milliseconds. After each kill the folder must hold only complete files under final names, the train state
  must name a complete weights file of its own step, and the previous checkpoint must be intact (bytes lost = 0).
* Training runs (three processes): one uninterrupted CLI run and one run SIGKILLed half-way through writing a
  checkpoint's weights file, then ``--resume True``; every later checkpoint and every logged loss must equal the
  uninterrupted run's bit for bit. Both runs get a NaN batch at step 3 (the update is skipped, training recovers)
  and NaN batches at steps 7-11, after which the run must stop with one ``error:`` line naming the last
  checkpoint, identically after the resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import ldm  # noqa: F401  (must precede mindspore)
import ldm.models.text_encoders  # noqa: F401  (imported before forking: the child only writes files)
import ldm.train.state as train_state
import ldm.train.trainer as trainer
from ldm.data.synthetic import make_shapes_dataset
from ldm.env import set_seed
from ldm.io.checkpoint import CheckpointError, read_state_dict
from ldm.io.model_io import save_model
from ldm.models.diffusion import build_model_from_config
from ldm.train.plot import draw_training_plot
from ldm.train.state import read_train_state_meta
from ldm.util import CONFIG_DIR, load_config
from tests.reliability.kill_points import die, in_killed_child

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples/stable_diffusion_v2/train_text_to_image.py"
DRIVER = Path(__file__).resolve().parent / "train_driver.py"
TINY = ROOT / "configs/train/train_config_lora_tiny.yaml"
OPTS = trainer.TrainOptions(use_lora=False)  # full-weights path of _checkpoint: no LoRA model needed


class _Param:
    def __init__(self, value: float):
        self.name, self.value = "model.diffusion_model.out.2.weight", value

    def asnumpy(self):
        return np.full((64, 64), self.value, np.float32)


class _Step:
    """What save_train_state reads from a TrainStep."""

    micro_step, grad_accum_steps = 0, 1

    def __init__(self, value: float):
        self.value = value

    def state_arrays(self):
        return {"adam_m.w": np.full(4096, self.value, np.float32), "global_step": np.array(int(self.value))}


def _write_checkpoint(ckpt_dir: Path, done: int) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)  # as run_training does before the first checkpoint
    model = SimpleNamespace(cond_stage_model=SimpleNamespace(family="sd1"))
    noise = SimpleNamespace(get_state=lambda: {"seed": done})
    trainer._checkpoint(model, [_Param(done)], _Step(done), noise, None, done, ckpt_dir, OPTS)


def _arm(primitive: str, nth: int, phase: str) -> None:
    """In the forked child: SIGKILL at the ``nth`` call of ``primitive`` (``before``, ``half`` or ``after`` it)."""
    import safetensors.numpy

    calls = {"mkstemp": 0, "save_file": 0, "fsync": 0, "replace": 0}

    def wrap(name, original):
        def hooked(*args, **kwargs):
            calls[name] += 1
            hit = name == primitive and calls[name] == nth
            if hit and phase == "before":
                die()
            result = original(*args, **kwargs)
            if hit and phase == "half":
                with open(args[1], "r+b") as f:
                    f.truncate(os.path.getsize(args[1]) // 2)
                die()
            if hit and phase == "after":
                die()
            return result

        return hooked

    tempfile.mkstemp = wrap("mkstemp", tempfile.mkstemp)
    save_file = wrap("save_file", safetensors.numpy.save_file)
    safetensors.numpy.save_file = save_file
    train_state.save_file = save_file
    os.fsync = wrap("fsync", os.fsync)
    os.replace = wrap("replace", os.replace)


# (primitive, nth call, phase): call 1 belongs to the weights file, call 2 to the train state
WRITER_KILLS = [
    ("mkstemp", 1, "before"),
    ("mkstemp", 1, "after"),
    ("save_file", 1, "half"),
    ("save_file", 1, "after"),
    ("fsync", 1, "after"),
    ("replace", 1, "after"),
    ("mkstemp", 2, "after"),
    ("save_file", 2, "half"),
    ("save_file", 2, "after"),
    ("fsync", 2, "after"),
    ("replace", 2, "after"),
]


def _final_files(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("primitive, nth, phase", WRITER_KILLS, ids=[f"{p}{n}-{ph}" for p, n, ph in WRITER_KILLS])
def test_sigkill_during_checkpoint_write_leaves_a_resumable_folder(tmp_path, primitive, nth, phase):
    """SIGKILL at one point of writing checkpoint 4 over checkpoint 2: only complete files under final names."""
    ckpt = tmp_path / "ckpt"
    _write_checkpoint(ckpt, 2)
    before = {name: (ckpt / name).read_bytes() for name in _final_files(ckpt)}

    assert in_killed_child(lambda: (_arm(primitive, nth, phase), _write_checkpoint(ckpt, 4))) == signal.SIGKILL

    names = _final_files(ckpt)
    assert set(names) <= {"unet-000002.safetensors", "unet-000004.safetensors", "train_state.safetensors"}
    assert all(p.name.startswith(".") and ".tmp" in p.name for p in ckpt.iterdir() if p.name not in names)
    for name in names:  # every file under a final name is complete and is either the old or the new version
        arrays = read_state_dict(ckpt / name)
        assert all(np.all(v == v.flat[0]) for v in arrays.values()), name
    assert (ckpt / "unet-000002.safetensors").read_bytes() == before["unet-000002.safetensors"]  # bytes lost: 0
    meta = read_train_state_meta(str(ckpt / "train_state.safetensors"))
    done = meta["data_position"]["batches_done"]
    assert done == (4 if (primitive, nth, phase) == ("replace", 2, "after") else 2)
    weights = read_state_dict(ckpt / meta["extra"]["weights"])  # the state names complete weights of its step
    assert weights["model.diffusion_model.out.2.weight"][0, 0] == done

    _write_checkpoint(ckpt, 4)  # what the resumed run does next: succeeds over any leftovers
    assert read_train_state_meta(str(ckpt / "train_state.safetensors"))["data_position"] == {"batches_done": 4}


def test_sigkill_mid_metrics_line_is_dropped_on_resume(tmp_path):
    """A metrics line torn by SIGKILL, and lines of steps after the resumed checkpoint, are dropped on resume."""
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2, 3):
        trainer._append_metrics(path, {"step": step, "loss": 0.5})

    def torn_append():
        with open(path, "a", encoding="utf-8") as f:
            f.write('{"step": 4, "lo')
            f.flush()
            die()

    assert in_killed_child(torn_append) == signal.SIGKILL
    trainer._trim_metrics(path, 2)
    trainer._append_metrics(path, {"step": 3, "loss": 0.25})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 0.5},
        {"step": 2, "loss": 0.5},
        {"step": 3, "loss": 0.25},
    ]


def test_sigkill_mid_loss_plot_keeps_previous_plot(tmp_path):
    """SIGKILL before the new loss plot is renamed into place: loss.png is still the previous, complete plot."""
    path = tmp_path / "loss.png"
    draw_training_plot([1, 2], [1.0, 0.5], [1e-4, 1e-4], path)
    before = path.read_bytes()
    redraw = lambda: draw_training_plot([1, 2, 3], [1.0, 1.0, 1.0], [], path)  # noqa: E731
    killed = in_killed_child(lambda: (_arm("replace", 1, "before"), redraw()))
    assert killed == signal.SIGKILL
    assert path.read_bytes() == before


@pytest.mark.parametrize("target", ["weights", "train state"])
def test_disk_full_while_writing_checkpoint(tmp_path, monkeypatch, target, disk_full_save_file):
    """ENOSPC half-way through a checkpoint write: a CheckpointError naming the file, old files intact, no temp."""
    import safetensors.numpy

    ckpt = tmp_path / "ckpt"
    _write_checkpoint(ckpt, 2)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    disk_full = disk_full_save_file

    if target == "weights":
        monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
        name = "unet-000004.safetensors"
    else:
        monkeypatch.setattr(train_state, "save_file", disk_full)
        name = "train_state.safetensors"
    with pytest.raises(CheckpointError, match=rf"{name}: write failed \(No space left on device\)"):
        _write_checkpoint(ckpt, 4)
    after = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.name != "unet-000004.safetensors"}
    assert after == before  # nothing torn, no temp file left, the previous checkpoint unchanged


# ----------------------------------------------------------------------------------------------- training runs
# Both runs get NaN images at step 3 (one skipped update, then recovery) and at steps 7-11 (five in a row: the run
# stops at step 11 with exit status 2). Checkpoints every 2 steps; the killed run dies writing lora-000004.
STEPS, INTERVAL, NAN_STEPS, STOP = 12, 2, "3,7,8,9,10,11", 11
CHECKPOINTS = [f"lora-{s:06d}.safetensors" for s in range(INTERVAL, STOP, INTERVAL)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_kill")
    set_seed(0)
    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    base = root / "base.safetensors"
    save_model(build_model_from_config(config), base, config=config)
    return {"root": root, "base": base, "data": make_shapes_dataset(root / "data", count=4, size=32)}


def _train(setup, out: Path, *args: str, env: dict):
    cmd = [sys.executable, str(DRIVER), str(SCRIPT), "--train_config", str(TINY), "--data_path", str(setup["data"])]
    cmd += ["--output_path", str(out), "--pretrained_model_path", str(setup["base"]), "--train_batch_size", "2"]
    cmd += ["--max_train_steps", str(STEPS), "--ckpt_save_interval", str(INTERVAL), "--seed", "7", *args]
    env = {**os.environ, "LDM_REL_NAN_STEPS": NAN_STEPS, **env}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_diverged(run, out: Path) -> None:
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"loss is NaN or infinite at steps 7..{STOP}" in errors[0], run.stderr[-3000:]
    assert str(out / "ckpt" / "train_state.safetensors") in errors[0] and "Traceback" not in run.stderr


@pytest.fixture(scope="module")
def straight(setup):
    out = setup["root"] / "straight"
    return out, _train(setup, out, env={})


def test_nan_loss_is_skipped_and_training_recovers(straight):
    """A NaN batch at step 3: that update is skipped (weights unchanged), the next losses are finite again."""
    out, _ = straight
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, STOP + 1))
    assert np.isnan(metrics[2]["loss"]) and metrics[2]["overflow"]
    assert all(np.isfinite(m["loss"]) and not m["overflow"] for m in metrics[3:6])
    four, six = (read_state_dict(out / "ckpt" / f"lora-{s:06d}.safetensors") for s in (4, 6))
    assert any(not np.array_equal(four[k], six[k]) for k in four)  # training went on after the skipped step


def test_persistent_nan_loss_stops_training_keeping_last_checkpoint(straight):
    """NaN losses at steps 7-11: the run stops at 11 with one error line naming the last checkpoint, and writes
    nothing after it; the checkpoints written during the NaN steps hold the unchanged (finite) weights."""
    out, run = straight
    _assert_diverged(run, out)
    assert _final_files(out / "ckpt") == [*CHECKPOINTS, "train_state.safetensors"]
    assert read_train_state_meta(str(out / "ckpt" / "train_state.safetensors"))["data_position"]["batches_done"] == 10
    six, ten = (read_state_dict(out / "ckpt" / f"lora-{s:06d}.safetensors") for s in (6, 10))
    assert all(np.array_equal(six[k], ten[k]) for k in six)  # every update from 7 on was skipped


def test_sigkill_mid_adapter_write_then_resume_equals_uninterrupted_run(setup, straight):
    """SIGKILL half-way through writing lora-000004, then --resume True: every later checkpoint and every logged
    loss equal the uninterrupted run's bit for bit, and the resumed run stops at the same NaN step."""
    ref, _ = straight
    out = setup["root"] / "killed"
    first = _train(setup, out, env={"LDM_REL_KILL_WRITING": "lora-000004.safetensors"})
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    ckpt = out / "ckpt"
    assert _final_files(ckpt) == ["lora-000002.safetensors", "train_state.safetensors"]  # no torn file
    assert read_train_state_meta(str(ckpt / "train_state.safetensors"))["data_position"] == {"batches_done": 2}
    assert len(_metrics(out)) == 4  # steps 3 and 4 were logged before the kill; resume drops them

    second = _train(setup, out, "--resume", "True", env={})
    _assert_diverged(second, out)
    got, want = _metrics(out), _metrics(ref)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    assert np.array_equal([m["loss"] for m in got], [m["loss"] for m in want], equal_nan=True)
    assert _final_files(ckpt) == _final_files(ref / "ckpt")
    for name in CHECKPOINTS:
        resumed, reference = read_state_dict(ckpt / name), read_state_dict(ref / "ckpt" / name)
        assert resumed.keys() == reference.keys()
        assert all(np.array_equal(resumed[k], reference[k]) for k in reference), name
    assert len([p for p in ckpt.iterdir() if p.name.startswith(".")]) <= 1  # the killed run's hidden temp file
