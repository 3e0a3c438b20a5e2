"""The CPU GroupNorm/LayerNorm kernels (ldm/models/cpu_kernels.cc) against torch, their switch and their build.

Tolerances: outputs and gradients within 2e-5 relative to the largest reference value. The kernels sum in float32
lanes over chunks of 2048 elements and add the chunks in double, torch sums in float32 its own way; the measured
differences are ~1e-6, so 2e-5 leaves room for other CPUs while an error in any term (a missing mean, a wrong
group, a gradient not summed over the batch) is O(1).
"""

from __future__ import annotations

import logging

import mindspore as ms
import numpy as np
import pytest
import torch

from ldm.compile_cache import cache_key
from ldm.models import cpu_kernels
from ldm.models.layers import GroupNorm, LayerNorm

RTOL = 2e-5


def rel_err(ours, ref) -> float:
    ref = np.asarray(ref)
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def gradients(cell, x: np.ndarray, upstream: np.ndarray):
    """(output, d loss/d x, d loss/d weight, d loss/d bias) of loss = sum(cell(x) * upstream), in PyNative mode."""
    params = [cell.weight, cell.bias]
    loss = lambda t: (cell(t) * ms.Tensor(upstream)).sum()  # noqa: E731
    dx, (dw, db) = ms.value_and_grad(loss, grad_position=0, weights=params)(ms.Tensor(x))[1]
    return cell(ms.Tensor(x)).asnumpy(), dx.asnumpy(), dw.asnumpy(), db.asnumpy()


def torch_gradients(fn, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, upstream: np.ndarray):
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    y = fn(tx, tw, tb)
    (y * torch.tensor(upstream)).sum().backward()
    return y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


def randomise(cell, rng):
    for p in (cell.weight, cell.bias):
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)))


@pytest.mark.parametrize(
    "shape, groups, eps",
    [((2, 64, 8, 8), 32, 1e-6), ((2, 64, 64, 64), 32, 1e-5), ((1, 96, 5, 7), 32, 1e-6), ((3, 8, 10), 4, 1e-5)],
)
def test_group_norm_matches_torch(shape, groups, eps):
    """Forward and every gradient; (2, 64, 64, 64) is large enough to be split across threads, (3, 8, 10) is 3-D."""
    assert cpu_kernels.enabled() and cpu_kernels.library(), "the CPU kernels should build on this machine"
    rng = np.random.default_rng(0)
    cell = GroupNorm(groups, shape[1], eps=eps)
    assert cell.cpu_kernel
    randomise(cell, rng)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    upstream = rng.standard_normal(shape).astype(np.float32)
    ours = gradients(cell, x, upstream)
    ref = torch_gradients(
        lambda t, w, b: torch.nn.functional.group_norm(t, groups, w, b, eps),
        x,
        cell.weight.asnumpy(),
        cell.bias.asnumpy(),
        upstream,
    )
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), ours, ref):
        assert rel_err(got, want) <= RTOL, f"{name}: {rel_err(got, want):.2e}"


@pytest.mark.parametrize("shape", [(2, 77, 64), (4, 1024, 128), (5, 3)])
def test_layer_norm_matches_torch(shape):
    rng = np.random.default_rng(1)
    cell = LayerNorm(shape[-1], eps=1e-5)
    assert cell.cpu_kernel
    randomise(cell, rng)
    x = (rng.standard_normal(shape) * 2 - 1).astype(np.float32)
    upstream = rng.standard_normal(shape).astype(np.float32)
    ours = gradients(cell, x, upstream)
    ref = torch_gradients(
        lambda t, w, b: torch.nn.functional.layer_norm(t, (shape[-1],), w, b, 1e-5),
        x,
        cell.weight.asnumpy(),
        cell.bias.asnumpy(),
        upstream,
    )
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), ours, ref):
        assert rel_err(got, want) <= RTOL, f"{name}: {rel_err(got, want):.2e}"


def test_graph_mode_and_float16_input():
    """A compiled cell gives the PyNative result; a float16 input is normalised in float32 and returned as float16."""
    rng = np.random.default_rng(2)
    cell = GroupNorm(32, 64, eps=1e-6)
    randomise(cell, rng)
    x = rng.standard_normal((2, 64, 16, 16)).astype(np.float32)
    eager = cell(ms.Tensor(x)).asnumpy()
    compiled = ms.jit(cell.construct)
    assert rel_err(compiled(ms.Tensor(x)).asnumpy(), eager) <= 1e-6
    half = cell(ms.Tensor(x, ms.float16))
    assert half.dtype == ms.float16
    assert rel_err(half.asnumpy().astype(np.float32), eager) <= 5e-3  # fp16 input and output rounding


def test_switch_off_uses_mindspore_kernels(monkeypatch):
    """LDM_CPU_KERNELS=0 builds cells on MindSpore's own kernels, with the same results, and changes the graph key."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 64, 8, 8)).astype(np.float32)
    on_key = cache_key("train", {"a": 1}, {})
    on = GroupNorm(32, 64)
    monkeypatch.setenv(cpu_kernels.ENABLE_VAR, "0")
    off = GroupNorm(32, 64)
    assert on.cpu_kernel and not off.cpu_kernel and not LayerNorm(8).cpu_kernel
    assert rel_err(off(ms.Tensor(x)).asnumpy(), on(ms.Tensor(x)).asnumpy()) <= 1e-5
    assert cache_key("train", {"a": 1}, {}) != on_key


def test_failed_build_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    """A compiler that fails leaves no library (and no partial file) behind; cells use MindSpore's kernels, and the
    graph key says so."""
    on_key = cache_key("train", {"a": 1}, {})
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'broken-cxx: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    cpu_kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
            cell = GroupNorm(32, 64)
            LayerNorm(16)
        assert not cell.cpu_kernel
        warnings = [r for r in caplog.records if "could not build" in r.getMessage()]
        assert len(warnings) == 1 and "cannot compile" in warnings[0].getMessage()
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
        x = np.random.default_rng(4).standard_normal((1, 64, 4, 4)).astype(np.float32)
        assert np.isfinite(cell(ms.Tensor(x)).asnumpy()).all()
        assert cache_key("train", {"a": 1}, {}) != on_key
    finally:
        cpu_kernels.library.cache_clear()


def test_build_lands_one_complete_library(monkeypatch, tmp_path):
    """A fresh cache gets the library at its digest path and nothing else; a second call reuses it."""
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path))
    cpu_kernels.library.cache_clear()
    try:
        path = cpu_kernels.library()
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert path is not None and files == [tmp_path / "kernels" / files[0].parent.name / cpu_kernels.LIBRARY_NAME]
        mtime = files[0].stat().st_mtime_ns
        cpu_kernels.library.cache_clear()
        assert cpu_kernels.library() == path and files[0].stat().st_mtime_ns == mtime
    finally:
        cpu_kernels.library.cache_clear()


def test_no_compiler_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "ldm-no-such-compiler")
    cpu_kernels._warn_no_compiler.cache_clear()
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        cells = [GroupNorm(32, 64), LayerNorm(16), GroupNorm(8, 16)]
    assert not any(c.cpu_kernel for c in cells)
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "no C++ compiler (ldm-no-such-compiler)" in caplog.records[0].getMessage()
