"""Atomic writes: a file or folder appears under its final name complete, or not at all, and the previous version
stays intact until then.

A file is written to a temp file in the same folder (same file system, so the rename is atomic), fsynced (the rename
must not reach the disk before the data) and renamed over the target; on any error, SIGKILL excepted, the temp file
is removed. A folder is built beside the target; replacing one swaps the two names in one step where the kernel can
(Linux ``renameat2(RENAME_EXCHANGE)``), so the target always names a whole version, then deletes the old one. Where it
cannot (another OS, a file system without the flag) the old folder is renamed aside first and the new one renamed
into place (the old one renamed back if that fails); a SIGKILL between those two renames leaves the old folder aside
as ``.<name>.*.old`` and the target missing until the next write of that folder renames it back before building.
Temp names start with ``.`` and contain ``.tmp``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

FILE_MODE = 0o644  # mkstemp creates 0600; a written file gets the usual mode
_AT_FDCWD = -100  # renameat2's "relative to the working directory"
_RENAME_EXCHANGE = 2  # linux/fs.h: swap the two names atomically
# errnos meaning "this kernel, libc or file system cannot exchange": fall back to two renames
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (same suffix, for writers that infer the format from it) for the caller to
    write; on a clean exit it is fsynced and renamed over ``path``, on an error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """``open`` for writing whose result replaces ``path`` only when the block ends without error."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
        yield f


def write_text(path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(text)


def write_json(path, data: Any, indent: int | None = 2, **kwargs: Any) -> None:
    """Write ``data`` as JSON (newline-terminated) to ``path`` atomically; ``kwargs`` go to ``json.dumps``."""
    write_text(path, json.dumps(data, indent=indent, **kwargs) + "\n")


def save_image(path, image) -> None:
    """Write a PIL image or an HxWxC uint8 array to ``path`` atomically, in the format its suffix names."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp)


def _asides(folder: Path) -> list[Path]:
    """Old versions of ``folder`` renamed aside by an interrupted swap, newest first."""
    found = folder.parent.glob(f".{folder.name}.*.tmp.old") if folder.parent.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _renameat2():
    """libc's ``renameat2`` (glibc 2.28+), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(a, b) -> bool:
    """Swap the names ``a`` and ``b`` (both must exist) in one atomic step; False where the platform or the file
    system cannot (nothing changed then); any other failure raises OSError."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def recover_folder(folder) -> None:
    """Undo a swap interrupted between its two renames: rename the old version back if ``folder`` is missing, and
    delete old versions left aside once ``folder`` exists."""
    folder = Path(folder)
    asides = _asides(folder)
    if asides and not folder.exists():
        os.replace(asides.pop(0), folder)
    for old in asides:
        _remove(old)


def _replace_by_two_renames(build: Path, folder: Path) -> None:
    """Rename ``folder`` aside, ``build`` into its place, then delete the old one (renamed back if the second rename
    fails). Used where names cannot be exchanged atomically."""
    old = build.with_name(f"{build.name}.old")
    os.replace(folder, old)
    try:
        os.replace(build, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    _remove(old)


@contextmanager
def atomic_folder(folder, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty build folder beside ``folder`` for the caller to fill; on a clean exit every file in it is
    fsynced and it takes ``folder``'s place (an existing ``folder`` only with ``overwrite``, else
    ``FileExistsError``); on an error it is removed and ``folder`` is untouched."""
    folder = Path(folder)
    recover_folder(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder}: already exists")
    folder.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield build
        for file in sorted(p for p in build.rglob("*") if p.is_file() and not p.is_symlink()):
            _fsync(file)
        if not (folder.exists() or folder.is_symlink()):
            os.replace(build, folder)
        elif exchange(build, folder):
            _remove(build)  # the old version, now under the build's name
        else:
            _replace_by_two_renames(build, folder)
    finally:
        if build.exists():
            shutil.rmtree(build)
