"""LoRA layers: the frozen Dense and Conv2d wrappers (LoRA, LoCon), the fused OpenCLIP ``in_proj`` delta, DoRA on
any of them, with merge/unmerge on the layer.

A LoRA layer adds ``up(down(dropout(x))) * (alpha / rank) * scale`` to a frozen linear map ``W x + b`` (PEFT's
convention ``scaling = alpha / rank``; ``alpha`` defaults to ``rank``, i.e. scaling 1, as diffusers, cloneofsimo and
MindONE train). ``down`` is initialised N(0, std=1/rank) and ``up`` to zeros, so an injected network computes exactly
what it computed before. ``scale`` is a runtime strength knob that is not stored with the weights. The weight
change itself is :func:`ldm.lora.adapter.delta_weight`, shared with the adapter-file arithmetic.

Naming. The frozen base keeps its Parameter objects *and names* (``...attn1.to_q.weight`` stays
``...attn1.to_q.weight``, unlike MindONE's ``...to_q.linear.weight``), so a full Stability/CompVis checkpoint still
loads into an injected network by its original names. The adapter parameters are ``<module>.lora_down.weight``
``[rank, in]`` and ``<module>.lora_up.weight`` ``[out, rank]`` (the MindONE names, and the PEFT/kohya shapes), the
names of the adapter file (:mod:`ldm.lora.adapter`); a LoCon layer's ``lora_down.weight`` is ``[rank, in, kh, kw]``
for kernels larger than 1x1, and DoRA adds ``<module>.dora_scale`` ``[out]``.

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
from mindspore.common.initializer import Normal, initializer

from ldm.lora.adapter import delta_weight, dora_factor
from ldm.models.layers import assign_array, mixed_precision_dtype

logger = logging.getLogger(__name__)

_LORA_DTYPES = (ms.float32, ms.float16)


class _Factor(nn.Cell):
    """One LoRA factor held as ``weight`` (so its parameter is ``<module>.lora_down.weight``), always float32."""

    def __init__(self, shape: tuple, init):
        super().__init__()
        self.weight = Parameter(initializer(init, shape, ms.float32), name="weight")


class LoRALayer(nn.Cell):
    """The low-rank branch shared by every LoRA variant: ``lora_up(lora_down(dropout(x))) * lora_mult``.

    Subclasses name the frozen weight the delta merges into (``_merge_target``) and apply the factors to their input
    (``_apply_factors``: a matmul for linear maps, convolutions for LoCon). ``kernel`` > 1x1 makes ``lora_down`` a
    ``[r, in, kh, kw]`` convolution (its ``up`` stays ``[out, r]``, a 1x1 conv). ``use_dora`` adds DoRA's magnitude
    ``dora_scale`` ``[out]``, initialised to the row norms of the base weight, and computes PEFT's
    ``(m / ||W + s dW|| - 1) W x + m / ||W + s dW|| * s * up(down(x))`` with the norm held constant in the backward
    pass (``lora_gate`` turns that extra term off while merged). ``lora_dtype`` is the compute dtype of the branch
    (float16 halves its activation memory; the parameters stay float32 either way).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha=None,
        dropout: float = 0.0,
        lora_dtype=ms.float32,
        kernel: tuple = (1, 1),
        use_dora: bool = False,
    ):
        super().__init__()
        fan_in = in_features * kernel[0] * kernel[1]
        if rank < 1 or rank > min(fan_in, out_features):
            raise ValueError(f"LoRA rank must be in [1, min(in, out) = {min(fan_in, out_features)}], got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if lora_dtype not in _LORA_DTYPES:
            raise ValueError(f"lora_dtype must be float32 or float16, got {lora_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = int(rank)
        self.kernel = tuple(kernel)
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = 1.0
        self.lora_dtype = lora_dtype
        self.merged = False
        self.use_dora = bool(use_dora)
        self.target = ""  # the inject_lora target pattern that selected this module
        down_shape = (rank, in_features) if self.kernel == (1, 1) else (rank, in_features) + self.kernel
        self.lora_down = _Factor(down_shape, Normal(1.0 / rank))
        self.lora_up = _Factor((out_features, rank), "zeros")
        self.has_dropout = dropout > 0
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_mult = Parameter(Tensor(self.scaling, ms.float32), name="lora_mult", requires_grad=False)
        if self.use_dora:
            self.dora_scale = Parameter(Tensor(np.ones(out_features, np.float32)), name="dora_scale")
            self.lora_gate = Parameter(Tensor(1.0, ms.float32), name="lora_gate", requires_grad=False)
            self._dora_factor = None  # m / ||W + dW|| of the merged weight, for unmerge

    @property
    def scaling(self) -> float:
        """PEFT's ``lora_alpha / r``."""
        return self.alpha / self.rank

    def _merge_target(self) -> Parameter:
        raise NotImplementedError

    def _apply_factors(self, x, down, up):
        raise NotImplementedError

    def _lora_branch(self, x, out_dtype):
        """``up(down(x)) * lora_mult`` of (already dropped-out) input ``x``, in ``out_dtype``."""
        down = self.lora_down.weight.astype(self.lora_dtype)
        up = self.lora_up.weight.astype(self.lora_dtype)
        h = self._apply_factors(x.astype(self.lora_dtype), down, up)
        return h.astype(out_dtype) * self.lora_mult.astype(out_dtype)

    def _dora_row_factor(self, weight):
        """``m / ||W + lora_mult * up @ down||`` per output row, float32 ``[out]``, with no gradient through the
        norm (DoRA section 4.3, as PEFT)."""
        rows = weight.astype(ms.float32).reshape(self.out_features, -1)
        delta = ops.matmul(self.lora_up.weight, self.lora_down.weight.reshape(self.rank, -1))
        full = rows + self.lora_mult * ops.stop_gradient(delta)
        norm = ops.stop_gradient(ops.sqrt((full * full).sum(axis=1)))
        return self.dora_scale / norm

    def _delta(self, x, base_out, weight, base_fn):
        """What the adapter adds to the bias-free base output ``base_out = base_fn(x, weight)``."""
        xd = self.dropout(x)
        lora = self._lora_branch(xd, base_out.dtype)
        if not self.use_dora:
            return lora
        factor = self._dora_row_factor(weight).astype(base_out.dtype)
        factor = factor.reshape((1, -1) + (1,) * (len(base_out.shape) - 2))
        plain = base_fn(xd, weight) if self.has_dropout else base_out
        return self.lora_gate.astype(base_out.dtype) * ((factor - 1) * plain + factor * lora)

    def _sync_mult(self) -> None:
        value = 0.0 if self.merged else self.scale * self.scaling
        assign_array(self.lora_mult, np.float32(value))
        if self.use_dora:
            assign_array(self.lora_gate, np.float32(0.0 if self.merged else 1.0))

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

    def init_magnitude(self) -> None:
        """DoRA: set ``dora_scale`` to the row norms of the base weight (the adapter then starts as a no-op)."""
        rows = self._merge_target().asnumpy().astype(np.float64).reshape(self.out_features, -1)
        assign_array(self.dora_scale, np.linalg.norm(rows, axis=1).astype(np.float32))

    def delta_weight(self) -> np.ndarray:
        """``scale * alpha / rank * up @ down`` as float32 in the merge target's shape (accumulated in float64)."""
        down, up = self.lora_down.weight.asnumpy(), self.lora_up.weight.asnumpy()
        delta = self.scale * delta_weight(down, up, self.alpha)
        return delta.reshape(self._merge_target().shape).astype(np.float32)

    def _write_merged(self, sign: float) -> None:
        target = self._merge_target()
        weight = target.asnumpy().astype(np.float64)
        delta = self.delta_weight().astype(np.float64)
        if not self.use_dora:
            value = weight + sign * delta
        elif sign > 0:
            self._dora_factor = dora_factor(weight, delta, self.dora_scale.asnumpy())
            value = (weight + delta) * self._dora_factor
        else:
            value = weight / self._dora_factor - delta
            self._dora_factor = None
        assign_array(target, value.astype(np.float32))

    def merge(self) -> None:
        """Fold the adapter into the base weight (``W += scale * alpha / r * up @ down``; DoRA: ``W = m (W + dW) /
        ||W + dW||``) and bypass the branch."""
        if self.merged:
            logger.warning("%s is already merged; nothing to do", self._merge_target().name)
            return
        self._write_merged(1.0)
        self.merged = True
        self._sync_mult()

    def unmerge(self) -> None:
        """Exact inverse of :meth:`merge` up to float32 rounding (the same delta and DoRA factor are undone)."""
        if not self.merged:
            logger.warning("%s is not merged; nothing to do", self._merge_target().name)
            return
        self._write_merged(-1.0)
        self.merged = False
        self._sync_mult()

    def lora_parameters(self) -> tuple:
        """The trainable adapter parameters: ``(lora_down.weight, lora_up.weight)`` plus DoRA's ``dora_scale``."""
        factors = (self.lora_down.weight, self.lora_up.weight)
        return factors + (self.dora_scale,) if self.use_dora else factors

    def _name_parameters(self, prefix: str) -> None:
        self.lora_down.weight.name = f"{prefix}.lora_down.weight"
        self.lora_up.weight.name = f"{prefix}.lora_up.weight"
        self.lora_mult.name = f"{prefix}.lora_mult"
        if self.use_dora:
            self.dora_scale.name = f"{prefix}.dora_scale"
            self.lora_gate.name = f"{prefix}.lora_gate"

    def extend_repr(self):
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, "
            f"kernel={self.kernel}, dora={self.use_dora}, scale={self.scale}, lora_dtype={self.lora_dtype}, "
            f"merged={self.merged}"
        )


class _LinearFactors(LoRALayer):
    """Factors applied as matmuls to 2-D input ``[n, in]``, through the subclass's ``self.matmul``
    (``MatMul(transpose_b=True)``): the kernel reads the factors transposed, so neither the forward nor the backward
    runs a Transpose per factor (two per layer each way in the small LoRA step's profile)."""

    def _apply_factors(self, x, down, up):
        return self.matmul(self.matmul(x, down), up)


class LoRAWrapper(LoRALayer):
    """A LoRA layer that takes over a frozen Dense/Conv2d: the base's ``weight``/``bias`` Parameters are reused
    (same objects, same names) and frozen, and a base switched to float16/bfloat16 with ``to_float`` keeps computing
    in that dtype."""

    def _take_over(self, base: nn.Cell) -> None:
        names = (base.weight.name, base.bias.name if base.has_bias else None)
        self.weight = base.weight
        self.has_bias = base.has_bias
        self.bias = base.bias if base.has_bias else None
        self.compute_dtype = mixed_precision_dtype(base)
        self.weight.requires_grad = False
        self.weight.name = names[0]  # Cell.__setattr__ may have renamed a Parameter with a generated name
        if self.has_bias:
            self.bias.requires_grad = False
            self.bias.name = names[1]
        if self.use_dora:
            self.init_magnitude()

    def _merge_target(self) -> Parameter:
        return self.weight

    def _base_inputs(self, x):
        if self.compute_dtype is None:
            return x, self.weight
        return x.astype(self.compute_dtype), self.weight.astype(self.compute_dtype)


class LoRADense(LoRAWrapper, _LinearFactors):
    """A frozen ``nn.Dense`` plus a LoRA branch: ``base(x) + up(down(dropout(x))) * alpha / rank * scale`` (DoRA:
    see :class:`LoRALayer`). The output has the base path's dtype."""

    def __init__(
        self, base: nn.Dense, rank: int, alpha=None, dropout: float = 0.0, lora_dtype=ms.float32, use_dora=False
    ):
        if not isinstance(base, nn.Dense):
            raise TypeError(f"LoRADense wraps an nn.Dense, got {type(base).__name__}")
        if base.activation_flag:
            raise ValueError("LoRADense does not support a Dense with a fused activation")
        super().__init__(base.in_channels, base.out_channels, rank, alpha, dropout, lora_dtype, use_dora=use_dora)
        self.matmul = ops.MatMul(transpose_b=True)
        self._take_over(base)

    @property
    def fusable(self) -> bool:
        """Whether ``ldm.models.fused_linear`` may compute this layer together with its siblings (no DoRA, dropout
        or bias: those keep the layer's own ``construct``)."""
        return not (self.use_dora or self.has_dropout or self.has_bias)

    def _base(self, x, weight):
        return self.matmul(x, weight)

    def construct(self, x):
        x_shape = x.shape
        x2d = x.reshape(-1, x_shape[-1]) if len(x_shape) != 2 else x
        h, w = self._base_inputs(x2d)
        out = self.matmul(h, w)
        out = out + self._delta(x2d, out, w, self._base)
        if self.has_bias:
            out = out + self.bias.astype(out.dtype)
        if len(x_shape) != 2:
            out = out.reshape(x_shape[:-1] + (self.out_features,))
        return out


class LoRAConv(LoRAWrapper):
    """A frozen ``nn.Conv2d`` plus a LoCon branch: ``lora_down`` is a convolution with the base's kernel, stride and
    padding into ``rank`` channels, ``lora_up`` a 1x1 convolution back to ``out`` (kohya's/LyCORIS' LoCon). A 1x1
    base keeps both factors 2-D, as in the adapter file."""

    def __init__(
        self, base: nn.Conv2d, rank: int, alpha=None, dropout: float = 0.0, lora_dtype=ms.float32, use_dora=False
    ):
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoRAConv wraps an nn.Conv2d, got {type(base).__name__}")
        if base.group != 1 or tuple(base.dilation) not in ((1, 1), (1, 1, 1, 1)):
            raise ValueError("LoRAConv supports ungrouped, undilated convolutions only")
        kernel = tuple(base.kernel_size)
        super().__init__(base.in_channels, base.out_channels, rank, alpha, dropout, lora_dtype, kernel, use_dora)
        self.conv2d = base.conv2d
        self.bias_add = base.bias_add
        self.down_conv = ops.Conv2D(rank, kernel, pad_mode=base.pad_mode, pad=base.padding, stride=base.stride)
        self.up_conv = ops.Conv2D(base.out_channels, 1)
        self._take_over(base)

    def _apply_factors(self, x, down, up):
        down = down.reshape((self.rank, self.in_features) + self.kernel)
        return self.up_conv(self.down_conv(x, down), up.reshape(self.out_features, self.rank, 1, 1))

    def _base(self, x, weight):
        return self.conv2d(x, weight)

    def construct(self, x):
        h, w = self._base_inputs(x)
        out = self.conv2d(h, w)
        out = out + self._delta(x, out, w, self._base)
        if self.has_bias:
            out = self.bias_add(out, self.bias.astype(out.dtype))
        return out


class LoRAFusedInProj(_LinearFactors):
    """Low-rank delta ``[.., 3d]`` for a fused q/k/v ``in_proj_weight`` ``[3d, d]`` of an OpenCLIP attention cell.

    The attention cell adds ``self.in_proj_lora(x)`` to ``x @ in_proj_weight.T + in_proj_bias``; the delta has the
    input's dtype (with DoRA it includes ``(m / ||.|| - 1) x @ in_proj_weight.T``, the row norms split exactly into
    q/k/v). The target weight is held by reference for :meth:`merge` and is not a parameter of this cell.
    """

    def __init__(
        self,
        in_proj_weight: Parameter,
        rank: int,
        alpha=None,
        dropout: float = 0.0,
        lora_dtype=ms.float32,
        use_dora=False,
    ):
        if len(in_proj_weight.shape) != 2:
            raise ValueError(f"{in_proj_weight.name}: expected a 2-D [3d, d] weight, got {in_proj_weight.shape}")
        out_features, in_features = in_proj_weight.shape
        super().__init__(in_features, out_features, rank, alpha, dropout, lora_dtype, use_dora=use_dora)
        object.__setattr__(self, "_target_weight", in_proj_weight)  # bypass Cell: not a parameter of this cell
        self.matmul = ops.MatMul(transpose_b=True)
        if self.use_dora:
            self.init_magnitude()

    def _merge_target(self) -> Parameter:
        return self._target_weight

    def _base(self, x, weight):
        return self.matmul(x, weight.astype(x.dtype))

    def construct(self, x):
        x_shape = x.shape
        x2d = x.reshape(-1, x_shape[-1]) if len(x_shape) != 2 else x
        if self.use_dora:
            weight = self._target_weight
            out = self._delta(x2d, self._base(x2d, weight), weight, self._base)
        else:
            out = self._lora_branch(self.dropout(x2d), x.dtype)
        if len(x_shape) != 2:
            out = out.reshape(x_shape[:-1] + (self.out_features,))
        return out
