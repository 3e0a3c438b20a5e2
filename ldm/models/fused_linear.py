"""Several bias-free linear maps of one input computed as one matmul (attention's q/k/v, or k/v of the context).

The small LoRA train step is launch-bound: each projection was its own MatMul (plus, with LoRA, a down and an up
MatMul, a Mul by the multiplier and an Add), forward and backward. :class:`FusedLinear` computes ``n`` projections
of the same input with one MatMul against the frozen weights concatenated inside the graph, and their LoRA branches
with one down MatMul (the ``lora_down`` weights stacked, ``[n r, in]``) and one up MatMul against the block-diagonal
``[n out, n r]`` of the ``lora_up`` weights (tiled, times a constant 0/1 mask), each block times its own
``lora_mult``. The parameters stay those of the separate layers (same objects and names, so state dicts, adapters,
merge and unmerge are unchanged); only the graph changes. Opt-in (``ldm.models.attention.plan_attention_fusion``):
on MindSpore 2.10's CPU backend the fused step ran fewer MatMuls, more kernels in all, and was not faster.

Which layers fuse is decided in Python before compiling (:func:`fusion_kind`): LoRA layers of one weight shape that
declare ``fusable`` (``ldm.lora.layers.LoRADense`` without DoRA, dropout or bias) with one rank, one LoRA dtype and
one compute dtype (``"lora"``); anything else keeps the separate layers. Plain frozen ``nn.Dense`` projections
(sampling without LoRA) stay separate: concatenating their weights in every call made a guided call of the tiny SD
slower (``benchmarks/README.md``, "Fused attention projections"). A layer is duck-typed (``weight``, ``has_bias``,
``lora_down.weight``, ``lora_up.weight``, ``lora_mult``, ``rank``, ``lora_dtype``, ``compute_dtype``) because models
come before LoRA in the import order.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

from ldm.models.layers import mixed_precision_dtype


def _compute_dtype(layer: nn.Cell):
    return layer.compute_dtype if hasattr(layer, "lora_down") else mixed_precision_dtype(layer)


def fusion_kind(layers) -> str:
    """``"lora"`` or ``""`` (do not fuse) for a tuple of layers of the same input."""
    if any(getattr(layer, "has_bias", True) for layer in layers):
        return ""
    if len({tuple(layer.weight.shape) for layer in layers}) != 1:  # e.g. to_q beside a context-width to_k
        return ""
    if len({_compute_dtype(layer) for layer in layers}) != 1 or len({layer.weight.dtype for layer in layers}) != 1:
        return ""
    if all(getattr(layer, "fusable", False) for layer in layers):
        if len({(layer.rank, layer.lora_dtype) for layer in layers}) == 1:
            return "lora"
    return ""


class FusedLinear(nn.Cell):
    """The concatenated output ``[.., n * out]`` of ``n`` fusable LoRA layers of equal shape (see the module
    docstring).

    Holds no parameters: ``construct`` takes the layers' weights as inputs, so the parameters keep living in (and
    being named by) the separate layers.
    """

    def __init__(self, layers, kind: str):
        super().__init__()
        if kind != "lora":
            raise ValueError(f"FusedLinear fuses LoRA layers only, got kind {kind!r}")
        self.n = len(layers)
        self.out_features = int(layers[0].weight.shape[0])
        self.compute_dtype = _compute_dtype(layers[0])
        self.matmul = ops.MatMul(transpose_b=True)
        rank = layers[0].rank
        self.lora_dtype = layers[0].lora_dtype
        mask = np.kron(np.eye(self.n, dtype=np.float32), np.ones((self.out_features, rank), np.float32))
        self.block_mask = Tensor(mask, self.lora_dtype)

    def construct(self, x, weights, downs, ups, mults):
        x_shape = x.shape
        x2d = x.reshape(-1, x_shape[-1])
        w = ops.cat(weights, axis=0)
        h = x2d
        if self.compute_dtype is not None:
            h, w = x2d.astype(self.compute_dtype), w.astype(self.compute_dtype)
        out = self.matmul(h, w)
        out = out + self._lora(x2d, downs, ups, mults, out.dtype)
        return out.reshape(x_shape[:-1] + (self.n * self.out_features,))

    def _lora(self, x2d, downs, ups, mults, out_dtype):
        """``up_i(down_i(x)) * mult_i`` of every layer, side by side: one down and one up MatMul."""
        down = ops.cat(downs, axis=0).astype(self.lora_dtype)
        up = ops.tile(ops.cat(ups, axis=0).astype(self.lora_dtype), (1, self.n)) * self.block_mask
        delta = self.matmul(self.matmul(x2d.astype(self.lora_dtype), down), up).astype(out_dtype)
        mult = ops.stack(mults).astype(out_dtype).reshape(self.n, 1)
        return (delta.reshape(-1, self.n, self.out_features) * mult).reshape(-1, self.n * self.out_features)
