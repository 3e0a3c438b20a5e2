"""Float32 GroupNorm and LayerNorm kernels for MindSpore's CPU backend.

MindSpore 2.10's CPU GroupNorm, GroupNormGrad and LayerNormGrad kernels take several times as long as PyTorch's and
were the largest difference between the two frameworks' small LoRA train step (benchmarks/README.md, "CPU norm
kernels"). ``cpu_kernels.cc`` computes the same statistics with vectorised sums; it is compiled once per
source version with the system C++ compiler into ``<cache root>/kernels/<digest>/`` and called through
``ops.Custom(func_type="aot")`` with its own backward, in graph and PyNative mode.

Used only when the device target is CPU; Ascend and GPU keep MindSpore's kernels. ``LDM_CPU_KERNELS=0`` turns the
kernels off (MindSpore's own are used), as does a machine without a compiler (``$CXX``, default ``g++``) or a failed
build: each logs one warning and the run carries on.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from ldm.atomic import atomic_path
from ldm.util import cache_root

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
ENABLE_VAR = "LDM_CPU_KERNELS"
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-std=c++17", "-fopenmp-simd", "-fno-math-errno")
LIBRARY_NAME = "libldm_cpu_kernels.so"

log = logging.getLogger(__name__)


def compiler() -> str | None:
    """The C++ compiler to build with (``$CXX``, default ``g++``), or None when it is not installed."""
    return shutil.which(os.environ.get("CXX") or "g++")


def enabled() -> bool:
    """Whether models built now use these kernels: device target CPU, not turned off, a compiler present."""
    import mindspore as ms

    if os.environ.get(ENABLE_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if ms.get_context("device_target") != "CPU":
        return False
    if compiler() is None:
        _warn_no_compiler()
        return False
    return True


def available() -> bool:
    """Whether a norm built now runs on these kernels: :func:`enabled` and the library built (building it if
    needed)."""
    return enabled() and library() is not None


@functools.cache
def _warn_no_compiler() -> None:
    log.warning(
        "no C++ compiler (%s) for the CPU norm kernels: MindSpore's own GroupNorm/LayerNorm are used (slower on CPU)",
        os.environ.get("CXX") or "g++",
    )


@functools.cache
def library() -> str | None:
    """Path of the compiled kernel library, building it on first use; None (one warning) when the build fails."""
    cxx = compiler()
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((cxx or "",) + FLAGS).encode()).hexdigest()[:16]
    folder = cache_root() / "kernels" / digest
    target = folder / LIBRARY_NAME
    if target.is_file():
        return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(target) as partial:  # concurrent builds (msrun workers) each land a complete file
            result = subprocess.run([cxx, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError("\n".join(result.stderr.strip().splitlines()[-5:]))
    except (RuntimeError, OSError) as err:
        log.warning("could not build the CPU norm kernels with %s (MindSpore's own are used):\n%s", cxx, err)
        return None
    return str(target)


def _custom(path: str, name: str, out_shape, out_dtype, bprop=None):
    from mindspore import ops

    return ops.Custom(f"{path}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot", bprop=bprop)


def _norm_ops(path: str, forward: str, backward: str, stats_shape):
    """The forward op of one kernel pair, whose backward calls the other; its extra outputs are mean and 1/std."""
    from mindspore import ops

    grad = _custom(path, backward, lambda x, w, b, c, m, r, dy: (x, w, w), lambda x, w, b, c, m, r, dy: (x, w, w))

    def bprop(x, weight, bias, cfg, out, dout):
        dx, dweight, dbias = grad(x, weight, bias, cfg, out[1], out[2], dout[0])
        return dx, dweight, dbias, ops.zeros_like(cfg)

    def shapes(x, w, b, c):
        return x, stats_shape(x), stats_shape(x)

    return _custom(path, forward, shapes, lambda x, w, b, c: (x, w, w), bprop)


def group_norm_op(num_groups: int):
    """The custom op ``(x, weight, bias, cfg) -> (y, mean, rstd)`` with cfg = [groups, eps] (float32); one instance
    per library and group count, so its backward is parsed once per process rather than once per layer."""
    return _group_norm_op(library(), num_groups)


def layer_norm_op():
    """The custom op ``(x, weight, bias, cfg) -> (y, mean, rstd)`` over the last dimension, cfg = [eps]; shared like
    :func:`group_norm_op`."""
    return _layer_norm_op(library())


@functools.cache
def _group_norm_op(path: str, num_groups: int):
    return _norm_ops(path, "GroupNormForward", "GroupNormBackward", lambda x: [x[0] * num_groups])


def _rows(x) -> list:
    count = 1
    for d in x[:-1]:
        count *= d
    return [count]


@functools.cache
def _layer_norm_op(path: str):
    return _norm_ops(path, "LayerNormForward", "LayerNormBackward", _rows)
