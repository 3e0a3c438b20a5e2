"""Reliability: SIGKILL at every step of ``ldm.atomic``'s file and folder writers, which every file the library
writes goes through (weights, train state, tokenizer, FID stats, plots, samples and sidecars, diffusers and PEFT
folders), and a full disk while generation saves an image.

Each write runs in a forked child of this test process that SIGKILLs itself at one named point (before or after a
temp file/folder is made, half-way through the data, after the fsync, before or after each rename). After the kill the
target must be the complete old version or the complete new one; leftovers are hidden ``.tmp`` names; the next write
succeeds. Folders are swapped in one exchange on Linux (the target never goes missing); in the two-rename fallback a
folder killed between the renames is missing, with the old one aside, and the next write restores it before anything
reads it.
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest

import ldm  # noqa: F401  (must precede mindspore)
from ldm.atomic import atomic_folder, recover_folder, write_text
from tests.reliability.kill_points import die, in_killed_child


def _arm(module, name: str, nth: int, phase: str) -> None:
    """In the child: SIGKILL before or after the ``nth`` call of ``module.name``."""
    original, calls = getattr(module, name), [0]

    def hooked(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and phase == "before":
            die()
        result = original(*args, **kwargs)
        if calls[0] == nth and phase == "after":
            die()
        return result

    setattr(module, name, hooked)


def _hidden_leftovers(folder: Path, keep: set[str]) -> bool:
    return all(p.name.startswith(".") and ".tmp" in p.name for p in folder.iterdir() if p.name not in keep)


FILE_KILLS = [
    ("mkstemp", 1, "after"),
    ("half", 1, "after"),
    ("fsync", 1, "after"),
    ("replace", 1, "before"),
    ("replace", 1, "after"),
]


@pytest.mark.parametrize("point, nth, phase", FILE_KILLS, ids=[f"{p}-{ph}" for p, _, ph in FILE_KILLS])
def test_sigkill_while_writing_a_file_leaves_old_or_new_never_partial(tmp_path, point, nth, phase):
    """SIGKILL at one step of an atomic file write over an old file: the file is complete (old or new)."""
    path = tmp_path / "notes.txt"
    old, new = "old\n" * 1000, "new\n" * 1000
    write_text(path, old)

    def write():
        if point == "half":
            text = new[: len(new) // 2]
            import ldm.atomic as atomic

            _arm(atomic, "_fsync", 1, "before")  # the data is half written when the process dies
            write_text(path, text)
        else:
            _arm({"mkstemp": tempfile, "fsync": os, "replace": os}[point], point, nth, phase)
            write_text(path, new)

    assert in_killed_child(write) == signal.SIGKILL
    assert path.read_text() == (new if (point, phase) == ("replace", "after") else old)
    assert _hidden_leftovers(tmp_path, {"notes.txt"})
    write_text(path, new)  # the next write succeeds over any leftovers
    assert path.read_text() == new


# The exchange swap: one renameat2 call swaps the names; the old version is then deleted.
EXCHANGE_KILLS = [
    ("mkdtemp", 1, "after"),
    ("fsync", 1, "after"),
    ("exchange", 1, "before"),
    ("exchange", 1, "after"),
]
# The two-rename fallback: os.replace call 1 renames the old folder aside, 2 renames the new one in.
RENAME_KILLS = [
    ("mkdtemp", 1, "after"),
    ("fsync", 1, "after"),
    ("replace", 1, "before"),
    ("replace", 1, "after"),
    ("replace", 2, "after"),
]


def _fill(build: Path, text: str) -> None:
    (build / "unet").mkdir()
    for name in ("unet/weights.bin", "model_index.json"):
        (build / name).write_text(text)


def _kill_during_swap(tmp_path: Path, point: str, nth: int, phase: str, exchange: bool) -> Path:
    """Write the old folder, then SIGKILL a child at ``point`` while it replaces it; the target's path."""
    import ldm.atomic as atomic

    target = tmp_path / "export"
    with atomic_folder(target) as build:
        _fill(build, "old")

    def swap():
        if not exchange:
            atomic.exchange = lambda a, b: False
        _arm({"mkdtemp": tempfile, "fsync": os, "replace": os, "exchange": atomic}[point], point, nth, phase)
        with atomic_folder(target, overwrite=True) as build:
            _fill(build, "new")

    assert in_killed_child(swap) == signal.SIGKILL
    return target


def _assert_whole_and_writable(tmp_path: Path, target: Path, expected: str) -> None:
    assert sorted(p.name for p in target.rglob("*")) == ["model_index.json", "unet", "weights.bin"]
    assert {(target / n).read_text() for n in ("unet/weights.bin", "model_index.json")} == {expected}
    with atomic_folder(target, overwrite=True) as build:
        _fill(build, "newer")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".old")] == []


@pytest.mark.parametrize("point, nth, phase", EXCHANGE_KILLS, ids=[f"{p}{n}-{ph}" for p, n, ph in EXCHANGE_KILLS])
def test_sigkill_while_exchanging_a_folder_never_leaves_it_missing(tmp_path, point, nth, phase):
    """SIGKILL at one step of the exchange swap: the folder is always there and whole, old or new."""
    target = _kill_during_swap(tmp_path, point, nth, phase, exchange=True)
    assert target.exists() and _hidden_leftovers(tmp_path, {"export"})
    _assert_whole_and_writable(tmp_path, target, "new" if (point, phase) == ("exchange", "after") else "old")


@pytest.mark.parametrize("point, nth, phase", RENAME_KILLS, ids=[f"{p}{n}-{ph}" for p, n, ph in RENAME_KILLS])
def test_sigkill_while_replacing_a_folder_by_two_renames_loses_nothing(tmp_path, point, nth, phase):
    """SIGKILL at one step of the two-rename fallback: the folder is whole (old or new), or aside and restored."""
    target = _kill_during_swap(tmp_path, point, nth, phase, exchange=False)
    between = (point, nth, phase) == ("replace", 1, "after")  # old aside, new not yet in: the one gap
    assert target.exists() != between and _hidden_leftovers(tmp_path, {"export"})
    recover_folder(target)  # what the next write of the folder does first
    _assert_whole_and_writable(tmp_path, target, "new" if (point, nth) == ("replace", 2) else "old")


@pytest.mark.filterwarnings("ignore:.*tokenise differently")
def test_sigkill_before_a_diffusers_export_is_renamed_in_keeps_the_old_export(tmp_path):
    """SIGKILL as an overwriting diffusers export is swapped into place: the old export is intact (not deleted)."""
    from ldm.io.diffusers_format import read_diffusers_folder, write_diffusers_folder
    from ldm.io.loading import cell_state_dict
    from ldm.models.diffusion import build_model_from_config
    from ldm.util import CONFIG_DIR, load_config

    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    state = cell_state_dict(build_model_from_config(config))
    target = tmp_path / "export"
    write_diffusers_folder(state, config, target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    doubled = {k: v * 2 for k, v in state.items()}

    def export():
        import ldm.atomic as atomic

        _arm(atomic, "exchange", 1, "before")  # the new folder is about to take the target's name
        write_diffusers_folder(doubled, config, target, overwrite=True)

    assert in_killed_child(export) == signal.SIGKILL
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    write_diffusers_folder(doubled, config, target, overwrite=True)
    loaded, _ = read_diffusers_folder(target)
    key = next(k for k in state if state[k].any())
    np.testing.assert_array_equal(loaded[key], doubled[key])


def test_disk_full_while_saving_a_generated_image_leaves_no_partial_png(tmp_path, monkeypatch):
    """ENOSPC half-way through saving a generated image: no partial PNG or sidecar under a final name."""
    from PIL import Image

    from ldm.generate import generate
    from ldm.generate_options import parse_options
    from ldm.util import CONFIG_DIR

    save = Image.Image.save

    def disk_full(self, fp, *args, **kwargs):
        save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as f:
            f.truncate(os.path.getsize(fp) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", disk_full)
    config = str(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    args = ["--prompt", "a", "--config", config, "--sampling_steps", "1", "--n_iter", "1", "--H", "32", "--W", "32"]
    job = parse_options([*args, "--output_path", str(tmp_path / "out")])
    with pytest.raises(OSError, match="No space left"):
        generate(job, log=lambda _: None, warn=lambda _: None)
    samples = tmp_path / "out" / "samples"
    assert [p.name for p in samples.iterdir() if not p.name.startswith(".")] == []
    assert _hidden_leftovers(samples, set())
