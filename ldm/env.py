"""Process and MindSpore context set-up shared by every entry point.

Two things must happen before ``import mindspore``: oneDNN must be kept off its AVX-512 convolution path (which is
~77x slower on the CPUs we measured) and numpy must be 1.x (MindSpore 2.10's extension is built against numpy 1).
``apply_process_defaults`` does both and is called when ``ldm`` is imported; ``init_env`` then configures the
MindSpore context (device, mode, jit level, threads, compile cache, seed, data parallel) and, per device target,
the device settings mindone uses on Ascend (operator precision mode, device memory cap, jit level O2).
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

from ldm.names import DEVICE_TARGETS

ONEDNN_ISA_VAR = "ONEDNN_MAX_CPU_ISA"
DEFAULT_ONEDNN_ISA = "AVX2"
# Set by the launchers MindSpore's init() works under: msrun (MS_ROLE), OpenMPI's mpirun, Ascend rank tables.
LAUNCHER_VARS = ("MS_ROLE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "RANK_TABLE_FILE", "MINDSPORE_HCCL_CONFIG_PATH")
# mindone's Ascend settings: let the CANN operators pick fp16 where fp32 has no kernel, and allow the whole device
# memory. Our networks set their dtypes explicitly (ldm.precision), so the precision mode only affects operators that
# have no kernel in the requested dtype.
ASCEND_PRECISION_MODE = "allow_fp32_to_fp16"
ASCEND_MAX_DEVICE_MEMORY = "1024GB"
# CPU kernel threads per process, overriding the default share of the cores (see ``default_cpu_threads``).
CPU_THREADS_VAR = "LDM_CPU_THREADS"
# Workers a launcher started on this machine: msrun exports the worker count, OpenMPI the local process count.
LOCAL_WORKER_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MS_WORKER_NUM")


class EnvironmentError_(RuntimeError):
    """The Python environment cannot run this package (wrong numpy, mindspore imported too early, ...)."""


def apply_process_defaults() -> None:
    """Set environment defaults that MindSpore reads at import time; the user's own values always win."""
    if "mindspore" not in sys.modules:
        os.environ.setdefault(ONEDNN_ISA_VAR, DEFAULT_ONEDNN_ISA)
    check_numpy()


def check_numpy() -> None:
    import numpy

    major = int(numpy.__version__.split(".")[0])
    if major >= 2:
        raise EnvironmentError_(
            f"numpy {numpy.__version__} is installed, but mindspore 2.10 needs numpy<2 "
            "(its C extension is built against numpy 1.x). Run: pip install 'numpy<2'"
        )


def check_launcher() -> None:
    """Raise a ValueError saying how to launch when data parallel is asked for in a process no launcher started."""
    if not any(os.environ.get(name) for name in LAUNCHER_VARS):
        raise ValueError(
            "data parallel (--use_parallel True) needs workers started by a launcher: run "
            "`scripts/run_train_parallel.sh NPROC <training options>` or msrun (see README, Data parallel)"
        )


def default_cpu_threads() -> int:
    """CPU kernel threads for this process: ``$LDM_CPU_THREADS`` if set, else this process's CPUs shared evenly
    among the workers a launcher started (msrun's ``MS_WORKER_NUM`` counts all workers, so on several machines set
    ``LDM_CPU_THREADS`` yourself). MindSpore's own default is 25 threads per process whatever the machine: two msrun
    workers on 2 cores then ran ~4x slower than with one thread each."""
    value = os.environ.get(CPU_THREADS_VAR, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{CPU_THREADS_VAR}={value!r}: expected a positive whole number of threads")
        return int(value)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = 1
    if any(os.environ.get(name) for name in LAUNCHER_VARS):
        for name in LOCAL_WORKER_VARS:
            if os.environ.get(name, "").isdigit():
                workers = max(1, int(os.environ[name]))
                break
    return max(1, cpus // workers)


@dataclass(frozen=True)
class DistInfo:
    """Rank layout of the current process (``rank=0, world_size=1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_env(
    device_target: str = "CPU",
    mode: int = 0,
    jit_level: str | None = None,
    seed: int | None = None,
    threads: int | None = None,
    compile_cache_dir: str | None = None,
    distributed: bool = False,
    precision_mode: str | None = None,
    max_device_memory: str | None = None,
) -> DistInfo:
    """Configure MindSpore for this process.

    mode: 0 = GRAPH_MODE (default, compiled), 1 = PYNATIVE_MODE.
    jit_level: O0/O1/O2; defaults to O2 on Ascend (whole-graph sinking) and O0 elsewhere.
    threads: CPU kernel threads; default ``default_cpu_threads()`` (this process's share of the CPUs; MindSpore's
    own default, 25, oversubscribes small machines).
    compile_cache_dir: reuse compiled graphs across runs (cuts the first graph-mode step several-fold).
    distributed: initialise the collective backend (HCCL on Ascend, NCCL on GPU, mccl on CPU) under ``msrun``
    and switch to data-parallel with mean-reduced gradients; a ValueError saying how to launch when no launcher
    started this process (MindSpore's own init() would fail with a traceback).
    precision_mode / max_device_memory: Ascend only (default ``allow_fp32_to_fp16`` and ``1024GB`` as in mindone);
    ``max_device_memory`` also applies on GPU when given. Neither touches a CPU run.
    """
    import mindspore as ms

    if distributed:
        check_launcher()

    device_target = device_target.upper() if device_target.lower() != "ascend" else "Ascend"
    if device_target not in DEVICE_TARGETS:
        raise ValueError(f"device_target must be one of {', '.join(DEVICE_TARGETS)}, got {device_target!r}")
    if mode not in (0, 1):
        raise ValueError(f"mode must be 0 (graph) or 1 (pynative), got {mode!r}")
    ms.set_device(device_target)
    ms.set_context(mode=ms.GRAPH_MODE if mode == 0 else ms.PYNATIVE_MODE)
    if jit_level is None:
        jit_level = "O2" if device_target == "Ascend" else "O0"
    if mode == 0:
        ms.set_context(jit_config={"jit_level": jit_level})
    if device_target == "Ascend":
        ms.device_context.ascend.op_precision.precision_mode(precision_mode or ASCEND_PRECISION_MODE)
        ms.runtime.set_memory(max_size=max_device_memory or ASCEND_MAX_DEVICE_MEMORY)
    elif device_target == "GPU" and max_device_memory:
        ms.runtime.set_memory(max_size=max_device_memory)
    if threads or device_target == "CPU":
        _set_cpu_threads(int(threads or default_cpu_threads()))
    if compile_cache_dir:
        ms.set_context(enable_compile_cache=True, compile_cache_path=compile_cache_dir)
    if seed is not None:
        set_seed(seed)
    if not distributed:
        return DistInfo()
    from mindspore.communication import get_group_size, get_rank, init

    init()
    info = DistInfo(rank=get_rank(), world_size=get_group_size())
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(
        parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=info.world_size
    )
    return info


def _set_cpu_threads(num: int) -> None:
    """Set MindSpore's CPU kernel threads once per process; MindSpore refuses a second setting, and a process that
    calls ``init_env`` again (a CLI run in-process, a test) keeps the first one."""
    from mindspore._c_expression import RuntimeConf

    if not RuntimeConf.get_instance().is_op_threads_num_configured():
        import mindspore as ms

        ms.device_context.cpu.op_tuning.threads_num(num)


def set_seed(seed: int) -> None:
    """Seed Python, numpy and MindSpore's global RNG."""
    import mindspore as ms
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    ms.set_seed(seed)
