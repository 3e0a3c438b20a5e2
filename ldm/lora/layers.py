"""LoRA layers: the frozen-Dense wrapper and the fused OpenCLIP ``in_proj`` delta, with merge/unmerge on the layer.

A LoRA layer adds ``up(down(dropout(x))) * (alpha / rank) * scale`` to a frozen linear map ``W x + b`` (PEFT's
convention ``scaling = alpha / rank``; ``alpha`` defaults to ``rank``, i.e. scaling 1, as diffusers, cloneofsimo and
MindONE train). ``down`` is initialised N(0, std=1/rank) and ``up`` to zeros, so an injected network computes exactly
what it computed before. ``scale`` is a runtime strength knob that is not stored with the weights. The weight
change itself is :func:`ldm.lora.adapter.delta_weight`, shared with the adapter-file arithmetic.

Naming. The frozen base keeps its Parameter objects *and names* (``...attn1.to_q.weight`` stays
``...attn1.to_q.weight``, unlike MindONE's ``...to_q.linear.weight``), so a full Stability/CompVis checkpoint still
loads into an injected network by its original names. The adapter parameters are ``<module>.lora_down.weight``
``[rank, in]`` and ``<module>.lora_up.weight`` ``[out, rank]`` (the MindONE names, and the PEFT/kohya shapes), the
names of the adapter file (:mod:`ldm.lora.adapter`).

Graph mode. MindSpore compiles Python attributes into the graph as constants, so the effective multiplier
``scale * alpha / rank`` (0 while merged) lives in a non-trainable scalar Parameter ``<module>.lora_mult``; changing
the scale or merging therefore takes effect without recompiling. It is not part of an adapter.

Fused OpenCLIP ``in_proj``. SD2's text encoder keeps q/k/v as one raw ``in_proj_weight`` ``[3d, d]`` Parameter inside
its attention cell, so there is no Dense to replace. :class:`LoRAFusedInProj` computes only the low-rank delta
``[.., 3d]``; an attention cell supports it by setting ``self.in_proj_lora = None`` in ``__init__`` and, in
``construct``, adding ``self.in_proj_lora(x)`` to its fused projection when it is not None. The delta is one rank-r
LoRA on the fused map (MindONE's choice), i.e. q/k/v share ``lora_down``; its parameters are
``<attn>.in_proj_lora.lora_{down,up}.weight``. Merging adds the delta to ``in_proj_weight``.
"""

from __future__ import annotations

import logging

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal

from ldm.lora.adapter import delta_weight
from ldm.models.layers import assign_array

logger = logging.getLogger(__name__)

_LORA_DTYPES = (ms.float32, ms.float16)


class _LowRankProj(nn.Dense):
    """Bias-free Dense on 2-D input that computes in the input's dtype (parameters stay float32)."""

    def construct(self, x):
        return self.matmul(x, self.weight.astype(x.dtype))


def _mixed_precision_dtype(cell: nn.Cell):
    """The dtype a cell was switched to with ``Cell.to_float`` (None if it computes in its parameters' dtype)."""
    flags = cell.get_flags()
    if flags.get("fp16"):
        return ms.float16
    if flags.get("bf16"):
        return ms.bfloat16
    return None


class LoRALayer(nn.Cell):
    """The low-rank branch shared by every LoRA variant: ``lora_up(lora_down(dropout(x))) * lora_mult``.

    Subclasses name the frozen weight the delta merges into (``_merge_target``). ``lora_dtype`` is the compute dtype
    of the branch (float16 halves its activation memory; the parameters stay float32 either way).
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha=None, dropout: float = 0.0, lora_dtype=ms.float32
    ):
        super().__init__()
        if rank < 1 or rank > min(in_features, out_features):
            raise ValueError(f"LoRA rank must be in [1, min(in, out) = {min(in_features, out_features)}], got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if lora_dtype not in _LORA_DTYPES:
            raise ValueError(f"lora_dtype must be float32 or float16, got {lora_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = 1.0
        self.lora_dtype = lora_dtype
        self.merged = False
        self.target = ""  # the inject_lora target pattern that selected this module
        self.lora_down = _LowRankProj(in_features, rank, has_bias=False, weight_init=Normal(1.0 / rank))
        self.lora_up = _LowRankProj(rank, out_features, has_bias=False, weight_init="zeros")
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_mult = Parameter(Tensor(self.scaling, ms.float32), name="lora_mult", requires_grad=False)

    @property
    def scaling(self) -> float:
        """PEFT's ``lora_alpha / r``."""
        return self.alpha / self.rank

    def _merge_target(self) -> Parameter:
        raise NotImplementedError

    def _lora_branch(self, x2d, out_dtype):
        """Low-rank delta of 2-D input ``x2d``, in ``out_dtype``."""
        h = self.lora_up(self.lora_down(self.dropout(x2d.astype(self.lora_dtype))))
        return h.astype(out_dtype) * self.lora_mult.astype(out_dtype)

    def _sync_mult(self) -> None:
        value = 0.0 if self.merged else self.scale * self.scaling
        assign_array(self.lora_mult, np.float32(value))

    def set_scale(self, scale: float) -> None:
        """Set the runtime strength; a merged layer is re-merged with the new scale."""
        merged = self.merged
        if merged:
            self.unmerge()
        self.scale = float(scale)
        self._sync_mult()
        if merged:
            self.merge()

    def set_alpha(self, alpha: float) -> None:
        """Set alpha (e.g. from a loaded adapter's metadata); scaling becomes ``alpha / rank``."""
        if self.merged:
            raise RuntimeError(f"{self.lora_down.weight.name}: unmerge before changing alpha")
        self.alpha = float(alpha)
        self._sync_mult()

    def delta_weight(self) -> np.ndarray:
        """``scale * alpha / rank * up @ down`` as float32 ``[out, in]`` (accumulated in float64)."""
        down, up = self.lora_down.weight.asnumpy(), self.lora_up.weight.asnumpy()
        return (self.scale * delta_weight(down, up, self.alpha)).astype(np.float32)

    def _add_to_target(self, sign: float) -> None:
        target = self._merge_target()
        value = target.asnumpy().astype(np.float32) + sign * self.delta_weight()
        assign_array(target, value)

    def merge(self) -> None:
        """Fold the adapter into the base weight (``W += scale * alpha / r * up @ down``) and bypass the branch."""
        if self.merged:
            logger.warning("%s is already merged; nothing to do", self._merge_target().name)
            return
        self._add_to_target(1.0)
        self.merged = True
        self._sync_mult()

    def unmerge(self) -> None:
        """Exact inverse of :meth:`merge` up to float32 rounding (the same delta is subtracted)."""
        if not self.merged:
            logger.warning("%s is not merged; nothing to do", self._merge_target().name)
            return
        self._add_to_target(-1.0)
        self.merged = False
        self._sync_mult()

    def lora_parameters(self) -> tuple[Parameter, Parameter]:
        """``(lora_down.weight, lora_up.weight)``."""
        return self.lora_down.weight, self.lora_up.weight

    def _name_parameters(self, prefix: str) -> None:
        self.lora_down.weight.name = f"{prefix}.lora_down.weight"
        self.lora_up.weight.name = f"{prefix}.lora_up.weight"
        self.lora_mult.name = f"{prefix}.lora_mult"

    def extend_repr(self):
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, "
            f"scale={self.scale}, lora_dtype={self.lora_dtype}, merged={self.merged}"
        )


class LoRADense(LoRALayer):
    """A frozen ``nn.Dense`` plus a LoRA branch: ``base(x) + up(down(dropout(x))) * alpha / rank * scale``.

    The base's ``weight``/``bias`` Parameters are reused (same objects, same names) and frozen. A base switched to
    float16/bfloat16 with ``to_float`` keeps computing in that dtype; the output has the base path's dtype.
    """

    def __init__(self, base: nn.Dense, rank: int, alpha=None, dropout: float = 0.0, lora_dtype=ms.float32):
        if not isinstance(base, nn.Dense):
            raise TypeError(f"LoRADense wraps an nn.Dense, got {type(base).__name__}")
        if base.activation_flag:
            raise ValueError("LoRADense does not support a Dense with a fused activation")
        super().__init__(base.in_channels, base.out_channels, rank, alpha, dropout, lora_dtype)
        names = (base.weight.name, base.bias.name if base.has_bias else None)
        self.weight = base.weight
        self.has_bias = base.has_bias
        self.bias = base.bias if base.has_bias else None
        self.compute_dtype = _mixed_precision_dtype(base)
        self.weight.requires_grad = False
        self.weight.name = names[0]  # Cell.__setattr__ may have renamed a Parameter with a generated name
        if self.has_bias:
            self.bias.requires_grad = False
            self.bias.name = names[1]
        self.matmul = ops.MatMul(transpose_b=True)

    def _merge_target(self) -> Parameter:
        return self.weight

    def construct(self, x):
        x_shape = x.shape
        x2d = x.reshape(-1, x_shape[-1]) if len(x_shape) != 2 else x
        h = x2d
        w = self.weight
        if self.compute_dtype is not None:
            h = h.astype(self.compute_dtype)
            w = w.astype(self.compute_dtype)
        out = self.matmul(h, w)
        if self.has_bias:
            out = out + self.bias.astype(out.dtype)
        out = out + self._lora_branch(x2d, out.dtype)
        if len(x_shape) != 2:
            out = out.reshape(x_shape[:-1] + (self.out_features,))
        return out


class LoRAFusedInProj(LoRALayer):
    """Low-rank delta ``[.., 3d]`` for a fused q/k/v ``in_proj_weight`` ``[3d, d]`` of an OpenCLIP attention cell.

    The attention cell adds ``self.in_proj_lora(x)`` to ``x @ in_proj_weight.T + in_proj_bias``; the delta has the
    input's dtype. The target weight is held by reference for :meth:`merge` and is not a parameter of this cell.
    """

    def __init__(self, in_proj_weight: Parameter, rank: int, alpha=None, dropout: float = 0.0, lora_dtype=ms.float32):
        if len(in_proj_weight.shape) != 2:
            raise ValueError(f"{in_proj_weight.name}: expected a 2-D [3d, d] weight, got {in_proj_weight.shape}")
        out_features, in_features = in_proj_weight.shape
        super().__init__(in_features, out_features, rank, alpha, dropout, lora_dtype)
        object.__setattr__(self, "_target_weight", in_proj_weight)  # bypass Cell: not a parameter of this cell

    def _merge_target(self) -> Parameter:
        return self._target_weight

    def construct(self, x):
        x_shape = x.shape
        x2d = x.reshape(-1, x_shape[-1]) if len(x_shape) != 2 else x
        out = self._lora_branch(x2d, x.dtype)
        if len(x_shape) != 2:
            out = out.reshape(x_shape[:-1] + (self.out_features,))
        return out
