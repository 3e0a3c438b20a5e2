"""MindSpore's compile cache, on by default for the CLIs: one folder per graph-shaping configuration.

MindSpore 2.10 saves a process's compiled graphs as ``rank_<r>/graph_cache/compile_cache_<i>.mindir``, numbered in
the order the process compiles them, and a later process reloads graph ``i`` for its ``i``-th compile. It checks
only a hash of the entry script and the source files it imports from outside ``sys.path`` (so not this package when
it is installed or on ``PYTHONPATH``): a changed width, input shape, constant or graph order silently runs the stale
graph (measured: a reloaded ``x @ w`` graph for 4 columns summed 8-column inputs as 4). The folder is therefore
keyed by everything that decides which graphs a run compiles and in which order: the job's options (all but those
in :data:`NOT_GRAPH_OPTIONS`), the resolved model config, what the job adds (resume position, image listing when
the shapes come from the data), the world size, the MindSpore version, whether the CPU norm kernels are on
(``ldm.models.cpu_kernels``) and a digest of this package's source. Two
processes never share a rank's folder at once: the second runs without the cache (a lock per rank).

Graphs go to ``<root>/compile/<job>-<key>``, the root being the FID weights' (``$LDM_CACHE_DIR``, default
``$XDG_CACHE_HOME/ldm``, i.e. ``~/.cache/ldm``); ``$LDM_COMPILE_CACHE_DIR`` replaces ``<root>/compile``. A run marks
its folder used; folders beyond the ``$LDM_COMPILE_CACHE_KEEP`` (default 32) most recently used are deleted, unless
a run holds them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from ldm.util import cache_root

LOGGER = logging.getLogger("ldm.compile_cache")
# Options that change no compiled graph and not the order of compiles: where outputs go, progress display, loaders.
NOT_GRAPH_OPTIONS = frozenset({"compile_cache", "output_path", "log_interval", "num_workers"})
ROOT_VAR = "LDM_COMPILE_CACHE_DIR"  # where the keyed folders go (tests point it at a temporary folder)
KEEP_VAR = "LDM_COMPILE_CACHE_KEEP"  # how many recently used configuration folders to keep
DEFAULT_KEEP = 32
MS_ENABLE_VAR = "MS_COMPILER_CACHE_ENABLE"  # MindSpore's own switch: a user who sets it keeps MindSpore's behaviour
# Worker counts a launcher exports (msrun, OpenMPI): a data-parallel graph holds the gradient all-reduce.
_WORLD_VARS = ("MS_WORKER_NUM", "OMPI_COMM_WORLD_SIZE")
_PACKAGE = Path(__file__).resolve().parent

_held_locks: list = []  # lock files kept open for the life of the process


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 of this package's Python and C++ source and bundled configs, so an upgrade or an edit never reuses a
    graph."""
    digest = hashlib.sha256()
    for path in sorted(p for p in _PACKAGE.rglob("*") if p.suffix in (".py", ".cc", ".yaml") and p.is_file()):
        digest.update(str(path.relative_to(_PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _entry_script_digest() -> str:
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is None or not script.is_file():
        return ""
    return hashlib.sha256(script.read_bytes()).hexdigest()


def folder_listing(folder: str | os.PathLike) -> list:
    """(relative path, size) of every file under ``folder``, for keys whose graph shapes follow the data."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def compile_cache_root() -> Path:
    """``$LDM_COMPILE_CACHE_DIR``, else ``<cache root>/compile`` (``ldm.util.cache_root``)."""
    return Path(os.environ.get(ROOT_VAR) or cache_root() / "compile")


def cache_key(job: str, options, extra: dict, ignore: tuple = ()) -> str:
    """16 hex digits of the SHA-256 of everything that shapes ``job``'s graphs (see the module docstring);
    ``options``: a dataclass or a dict; ``ignore``: options the job replaces by what they decide in ``extra``
    (prompt texts by their shapes)."""
    from ldm.models import cpu_kernels

    values = options if isinstance(options, dict) else dataclasses.asdict(options)
    values = {k: v for k, v in values.items() if k not in NOT_GRAPH_OPTIONS | set(ignore)}
    parts = {
        "job": job,
        "options": values,
        "extra": extra,
        "world_size": next((os.environ[v] for v in _WORLD_VARS if os.environ.get(v)), "1"),
        "mindspore": importlib.metadata.version("mindspore"),
        "source": source_digest(),
        "entry": _entry_script_digest(),
        "cpu_kernels": cpu_kernels.available(),  # switched off, no compiler or a failed build: MindSpore's norms
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _lock(folder: Path, rank: int) -> bool:
    """Hold an exclusive lock on this rank's part of ``folder`` until the process ends; False if another holds it."""
    import fcntl

    handle = open(folder / f".lock-rank{rank}", "a")  # noqa: SIM115  (held open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return False
    _held_locks.append(handle)
    return True


def keep_count() -> int:
    """``$LDM_COMPILE_CACHE_KEEP`` (a positive whole number), else :data:`DEFAULT_KEEP`."""
    value = os.environ.get(KEEP_VAR, "").strip()
    if not value:
        return DEFAULT_KEEP
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{KEEP_VAR}={value!r}: expected a positive whole number of folders")
    return int(value)


def _held_by_another_run(folder: Path) -> bool:
    """Whether a run (this process included) holds one of ``folder``'s rank locks."""
    import fcntl

    for lock in folder.glob(".lock-rank*"):
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
    return False


def prune(root: Path, keep: int) -> list[Path]:
    """Delete the configuration folders under ``root`` beyond the ``keep`` most recently used (a run sets its
    folder's mtime), leaving any a run holds; the deleted folders."""
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
    removed = []
    for folder in folders[keep:]:
        if not _held_by_another_run(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def use_compile_cache(
    enabled: bool, mode: int, job: str, options, extra: dict, rank: int = 0, ignore: tuple = (), log=LOGGER.info
) -> Path | None:
    """Point MindSpore's compile cache at this configuration's folder (call after ``init_env`` and before the first
    graph compiles) and log which folder and whether it was warm; the folder, or None when the cache is off
    (``--compile_cache False``, PyNative, MindSpore's own ``MS_COMPILER_CACHE_ENABLE`` set by the user, the folder
    in use by another process or not writable); ``log`` takes the one line saying which."""
    if not enabled or mode != 0:
        return None
    if os.environ.get(MS_ENABLE_VAR):
        log(f"compile cache: {MS_ENABLE_VAR} is set, MindSpore's own settings apply")
        return None
    folder = compile_cache_root() / f"{job}-{cache_key(job, options, extra, ignore)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not _lock(folder, rank):
            log(f"compile cache: {folder} is in use by another run; compiling without it")
            return None
    except OSError as exc:  # a read-only or full cache folder costs the cache, not the run
        log(f"compile cache: cannot use {folder} ({exc.strerror or exc}); compiling without it")
        return None
    keep = keep_count()
    try:
        os.utime(folder)  # most recently used
        removed = prune(folder.parent, keep)
    except OSError as exc:
        log(f"compile cache: could not clean {folder.parent} ({exc.strerror or exc})")
        removed = []
    if removed:
        log(f"compile cache: deleted {len(removed)} least recently used folder(s), keeping {keep} ({KEEP_VAR})")
    # MindSpore's file names: compile_cache_<i>.mindir, prefixed with the role under msrun (MS_WORKERcompile_...)
    warm = any((folder / f"rank_{rank}" / "graph_cache").glob("*compile_cache_0.mindir"))
    import mindspore as ms

    ms.set_context(enable_compile_cache=True, compile_cache_path=str(folder))
    log(f"compile cache: {folder} ({'warm: reloading its graphs' if warm else 'cold: filling it'})")
    return folder
