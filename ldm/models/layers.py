"""Building blocks whose parameters carry PyTorch names (``weight``/``bias``).

MindSpore's own norm and embedding cells name their parameters ``gamma``/``beta``/``embedding_table``. Stability,
CompVis and diffusers checkpoints use ``weight``/``bias``; keeping those names makes checkpoint import an identity
map instead of a rename table. Norms compute in float32 and return the input dtype, so fp16 models stay stable.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import mindspore as ms
import numpy as np
from mindspore import Parameter, mint, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindspore.nn.utils import no_init_parameters

from ldm.models import cpu_kernels


def _ones(n: int) -> Parameter:
    return Parameter(initializer("ones", (n,), ms.float32), name="weight")


def _zeros(n: int) -> Parameter:
    return Parameter(initializer("zeros", (n,), ms.float32), name="bias")


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm: statistics over (channels/groups, *spatial) per sample and group."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels {num_channels} is not divisible by num_groups {num_groups}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = _ones(num_channels)
            self.bias = _zeros(num_channels)
        else:
            self.fixed_weight = ms.Tensor(np.ones(num_channels, np.float32))
            self.fixed_bias = ms.Tensor(np.zeros(num_channels, np.float32))
        self.cpu_kernel = cpu_kernels.available()
        if self.cpu_kernel:
            self.fused = cpu_kernels.group_norm_op(num_groups)
            self.fused_config = ms.Tensor(np.array([num_groups, eps], np.float32))

    def construct(self, x):
        """In float32, returning x's dtype. On CPU one fused kernel (``cpu_kernels``); elsewhere MindSpore's
        GroupNorm kernel: the same statistics as spelling the norm out with mean/square/rsqrt (to ~1e-7 relative),
        without that spelling's half-dozen full-size temporaries (measured 13x the input's size at 128 channels x
        256x256, which dominated eager VAE memory at 512px)."""
        weight = self.weight if self.affine else self.fixed_weight
        bias = self.bias if self.affine else self.fixed_bias
        if self.cpu_kernel:
            return self.fused(x.astype(ms.float32), weight, bias, self.fused_config)[0].astype(x.dtype)
        h = mint.nn.functional.group_norm(x.astype(ms.float32), self.num_groups, weight, bias, self.eps)
        return h.astype(x.dtype)


class LayerNorm(nn.Cell):
    """torch.nn.LayerNorm over the last dimension, in float32 (one fused kernel on CPU, ``cpu_kernels``)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5):
        super().__init__()
        self.weight = _ones(normalized_shape)
        self.bias = _zeros(normalized_shape)
        self.eps = eps
        self.cpu_kernel = cpu_kernels.available()
        if self.cpu_kernel:
            self.fused = cpu_kernels.layer_norm_op()
            self.fused_config = ms.Tensor(np.array([eps], np.float32))
        else:
            self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        dtype = x.dtype
        if self.cpu_kernel:
            return self.fused(x.astype(ms.float32), self.weight, self.bias, self.fused_config)[0].astype(dtype)
        y, _, _ = self.layer_norm(x.astype(ms.float32), self.weight, self.bias)
        return y.astype(dtype)


class Embedding(nn.Cell):
    """torch.nn.Embedding: a ``weight`` table indexed by integer ids."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = Parameter(initializer(Normal(0.02), (num_embeddings, embedding_dim), ms.float32), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


def Conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    """torch-style Conv2d (explicit symmetric padding, with bias)."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        pad_mode="pad" if padding else "valid",
        padding=padding,
        has_bias=True,
        weight_init="he_uniform",
        bias_init="zeros",
    )


def Linear(in_features: int, out_features: int, bias: bool = True) -> nn.Dense:
    """torch-style Linear (weight [out, in])."""
    return nn.Dense(in_features, out_features, has_bias=bias, weight_init="he_uniform", bias_init="zeros")


def mixed_precision_dtype(cell: nn.Cell):
    """The dtype a cell was switched to with ``Cell.to_float`` (None if it computes in its parameters' dtype)."""
    flags = cell.get_flags()
    if flags.get("fp16"):
        return ms.float16
    if flags.get("bf16"):
        return ms.bfloat16
    return None


def assign_array(param: Parameter, value) -> None:
    """Write ``value`` into ``param`` in place, cast to the parameter's dtype.

    ``Parameter.set_data`` replaces the parameter's tensor object, and functions already compiled with ``ms.jit``
    keep using the old one: they silently stop seeing the parameter (measured with MindSpore 2.10, graph and
    PyNative modes). An in-place ``ops.assign`` keeps compiled steps, samplers and the Python side in sync. A
    parameter still holding its lazy initializer has never been compiled against and simply takes ``set_data``.
    """
    tensor = value if isinstance(value, ms.Tensor) else ms.Tensor(np.asarray(value))
    if tensor.dtype != param.dtype:
        tensor = tensor.astype(param.dtype)
    if param.has_init:
        param.set_data(tensor)
    else:
        ops.assign(param, tensor)


@contextmanager
def uninitialised_parameters() -> Iterator[None]:
    """Parameters created inside (from ``initializer``, as all of our networks' are) hold no memory until a value is
    assigned (:func:`assign_array`) or their initializer is run (``init_data``).

    For a model about to be loaded from a checkpoint: drawing 5 GB of random values only to overwrite them kept the
    built model and the read state dict resident together, the peak of a full-size load. MindSpore 2.10's
    ``no_init_parameters`` does the work (it marks the ``Parameter`` class while the block runs). The weights loaded
    later must stay returnable to the system when a network is released, hence :func:`_pin_mmap_threshold`.
    """
    _pin_mmap_threshold()
    with no_init_parameters():
        yield


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_GLIBC_DEFAULT_MMAP_THRESHOLD = 128 * 1024


def _pin_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at its default, 128 KiB (no-op elsewhere).

    glibc raises the threshold (up to 32 MiB) each time a large mapped block is freed, and loading frees one read
    array per parameter; the weights copied into parameters afterwards then come from the heap, where a released
    network's weights leave holes the process keeps. Measured on SD2-base: releasing the text encoder after encoding
    the prompts returned nothing (RSS 5.31 GiB) after a load into an uninitialised model, 1.08 GiB with the
    threshold pinned (4.23 GiB, as with a model built with random values), which one 512px image needs.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_MMAP_THRESHOLD)


def uninitialised_names(cell: nn.Cell) -> list[str]:
    """Names of ``cell``'s parameters that still hold only their initializer (nothing assigned yet)."""
    return [name for name, param in cell.parameters_dict().items() if param.has_init]
