"""ldm.atomic: a failed write leaves the previous file or folder as it was and no temp file; a folder swap exchanges the
two names in one step where Linux can; where it cannot, a swap whose second rename fails puts the old folder back and
an old folder left aside by a killed swap is restored by the next write."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

import ldm.atomic
from ldm.atomic import atomic_folder, atomic_open, atomic_path, recover_folder, save_image, write_json, write_text


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_helpers_write_complete_files_with_the_usual_mode(tmp_path):
    write_text(tmp_path / "a.txt", "héllo\n")
    write_json(tmp_path / "b.json", {"x": [1, 2]})
    save_image(tmp_path / "c.png", np.full((4, 6, 3), 200, np.uint8))
    with atomic_open(tmp_path / "d.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "b.json").read_text().endswith("}\n")
    with Image.open(tmp_path / "c.png") as img:
        assert img.format == "PNG" and img.size == (6, 4)
    assert (tmp_path / "d.bin").read_bytes() == b"\x00\x01"
    assert _names(tmp_path) == ["a.txt", "b.json", "c.png", "d.bin"]  # no temp file left
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644


def test_error_while_writing_keeps_the_previous_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"step": 1})
    with pytest.raises(RuntimeError, match="boom"), atomic_open(path) as f:
        f.write('{"step": 2, "half')
        raise RuntimeError("boom")
    assert json.loads(path.read_text()) == {"step": 1}
    assert _names(tmp_path) == ["state.json"]


def test_temp_path_is_hidden_beside_the_target_with_its_suffix(tmp_path):
    with atomic_path(tmp_path / "grid.png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".grid.png.") and tmp.name.endswith(".tmp.png")
        tmp.write_bytes(b"x")
    assert _names(tmp_path) == ["grid.png"]


def test_folder_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "export"
    with atomic_folder(target) as build:
        (build / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="export: already exists"), atomic_folder(target):
        pass
    with atomic_folder(target, overwrite=True) as build:
        assert not (target / "new.txt").exists()  # nothing appears before the block ends
        (build / "sub").mkdir()
        (build / "sub" / "new.txt").write_text("new")
    assert _names(target) == ["sub"] and (target / "sub" / "new.txt").read_text() == "new"
    assert _names(tmp_path) == ["export"]  # the build folder and the old folder are gone


def test_error_while_building_a_folder_leaves_the_old_one(tmp_path):
    target = tmp_path / "export"
    with atomic_folder(target) as build:
        (build / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_folder(target, overwrite=True) as build:
        (build / "new.txt").write_text("ne")
        raise OSError("disk full")
    assert _names(tmp_path) == ["export"] and _names(target) == ["old.txt"]


def test_folders_are_swapped_in_one_step_on_linux(tmp_path, monkeypatch):
    """Where renameat2 exists the swap calls no os.replace (the one gap of the two-rename swap never opens)."""
    target = tmp_path / "export"
    with atomic_folder(target) as build:
        (build / "old.txt").write_text("old")
    if not ldm.atomic.exchange(tmp_path / "export", target):
        pytest.fail("renameat2(RENAME_EXCHANGE) is not available on this Linux machine")

    def no_replace(src, dst):
        raise AssertionError(f"os.replace({src}, {dst}) called during an exchange swap")

    monkeypatch.setattr(os, "replace", no_replace)
    with atomic_folder(target, overwrite=True) as build:
        (build / "new.txt").write_text("new")
    assert _names(tmp_path) == ["export"] and _names(target) == ["new.txt"]


def test_exchange_of_a_missing_name_raises_and_changes_nothing(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError):
        ldm.atomic.exchange(tmp_path / "a", tmp_path / "missing")
    assert _names(tmp_path) == ["a"]


def test_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    """The fallback where names cannot be exchanged (another OS or file system)."""
    target = tmp_path / "export"
    with atomic_folder(target) as build:
        (build / "old.txt").write_text("old")
    monkeypatch.setattr(ldm.atomic, "exchange", lambda a, b: False)
    replace = os.replace

    def failing(src, dst):
        if str(dst) == str(target) and ".old" not in str(src):
            raise OSError("rename refused")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="rename refused"), atomic_folder(target, overwrite=True) as build:
        (build / "new.txt").write_text("new")
    assert _names(tmp_path) == ["export"] and _names(target) == ["old.txt"]


def test_old_folder_left_aside_is_restored_then_cleaned(tmp_path):
    """The state a SIGKILL between the swap's two renames leaves: no target, the old folder aside, the new build."""
    target = tmp_path / "export"
    aside, build = tmp_path / ".export.abc.tmp.old", tmp_path / ".export.abc.tmp"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    build.mkdir()
    recover_folder(target)
    assert _names(target) == ["old.txt"] and not aside.exists()
    (tmp_path / ".export.def.tmp.old").mkdir()  # an old folder left after the new one was in place
    with atomic_folder(target, overwrite=True) as new:
        (new / "new.txt").write_text("new")
    assert _names(target) == ["new.txt"] and not (tmp_path / ".export.def.tmp.old").exists()
