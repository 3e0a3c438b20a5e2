"""Transformer blocks of the Stable Diffusion UNet, with original-LDM parameter names.

Names follow CompVis/Stability ``ldm/modules/attention.py`` (``attn1.to_q``, ``attn2.to_out.0``, ``ff.net.0.proj``,
``ff.net.2``, ``proj_in``/``proj_out``) so checkpoints load without renaming. Attention runs as batched matmuls with
the softmax in float32; on Ascend an optional fused flash-attention kernel can replace that path.
``attention_slice_size`` computes the scores for that many (batch x head) rows at a time, as diffusers'
``enable_attention_slicing`` does: at 64x64 latents one head's scores are 4096x4096 floats (64 MiB), so slicing caps
the attention workspace of inference at a few slices instead of all batch x heads at once. Each row is computed by
the same operations either way, so the output is unchanged.
``memory_efficient_attention`` goes further for training: the same sliced forward, with a custom backward that
recomputes each slice's scores from q, k and v, so no (batch x head) score matrix is kept for the backward pass and
at most one slice's scores exist at a time. The forward output is the same as the plain path's; the gradients are
the same formulas evaluated slice by slice (equal to float rounding).
With LoRA on them, self-attention's q/k/v and cross-attention's k/v can run as one projection each
(:mod:`ldm.models.fused_linear`, opt-in through :func:`plan_attention_fusion`); the parameters stay separate.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ldm.models.fused_linear import FusedLinear, fusion_kind
from ldm.models.layers import Conv2d, GroupNorm, LayerNorm, Linear

_FA_HEAD_ALIGN = 16  # flash_attention_score needs a head size that is a multiple of 16


def use_flash_attention(enable_flash_attention: bool) -> bool:
    """True only when flash attention is requested and the current device target is Ascend (never on CPU/GPU)."""
    return bool(enable_flash_attention) and ms.get_context("device_target") == "Ascend"


class CrossAttention(nn.Cell):
    """Multi-head attention of ``x`` over ``context`` (self-attention when ``context_dim`` is None)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        enable_flash_attention: bool = False,
        attention_slice_size: int = 0,
        upcast_attention: bool = False,
    ):
        super().__init__()
        if heads < 1 or dim_head < 1:
            raise ValueError(f"heads and dim_head must be positive, got heads={heads}, dim_head={dim_head}")
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.SequentialCell([Linear(inner_dim, query_dim), nn.Dropout(p=dropout)])
        self.use_flash = use_flash_attention(enable_flash_attention)
        self.fa_pad = (-dim_head) % _FA_HEAD_ALIGN
        if attention_slice_size < 0:
            raise ValueError(f"attention_slice_size must be >= 0 (0: no slicing), got {attention_slice_size}")
        self.slice_size = int(attention_slice_size)
        self.upcast = bool(upcast_attention)
        self.memory_efficient = None  # a MemoryEfficientAttention once set_memory_efficient(True)
        self.core = AttentionCore()
        self.plan_fusion()

    def plan_fusion(self, enable: bool = True) -> None:
        """Choose (before compiling) whether q/k/v of self-attention and k/v of cross-attention run as one
        :class:`~ldm.models.fused_linear.FusedLinear` each, from the layers present now (plan again after
        ``ldm.lora.inject_lora``). ``enable=False``, the state after building, keeps the separate layers."""
        qkv = fusion_kind((self.to_q, self.to_k, self.to_v)) if enable else ""
        kv = fusion_kind((self.to_k, self.to_v)) if enable else ""
        self.fused_qkv = FusedLinear((self.to_q, self.to_k, self.to_v), qkv) if qkv else None
        self.fused_kv = FusedLinear((self.to_k, self.to_v), kv) if kv else None

    def set_memory_efficient(self, enable: bool) -> None:
        """Switch the recomputing-backward attention on or off (before a graph is compiled, or eagerly)."""
        self.memory_efficient = MemoryEfficientAttention() if enable else None

    def _split_heads(self, x):
        """(B, S, H*D) -> (B, H, S, D)."""
        b, s, _ = x.shape
        return x.reshape(b, s, self.heads, self.dim_head).transpose(0, 2, 1, 3)

    def _attention(self, q, k, v):
        """softmax(q k^T * scale) v over (B, H, S, D) tensors; q is scaled first to keep fp16 scores in range.

        With ``upcast`` a low-precision q and k are cast to float32 first, so the scores cannot overflow (SD2.1-v's
        black images in fp16); the values and the output keep the compute dtype."""
        b, h, n, d = q.shape
        if self.upcast and q.dtype != ms.float32:
            q, k = q.astype(ms.float32), k.astype(ms.float32)
        m = k.shape[2]
        q = (q * self.scale).reshape(b * h, n, d)
        k = k.reshape(b * h, m, d)
        v = v.reshape(b * h, m, d)
        rows = b * h
        if self.memory_efficient is not None:
            return self.memory_efficient(q, k, v).reshape(b, h, n, d)
        if not self.slice_size or self.slice_size >= rows:
            return self.core(q, k, v)[0].reshape(b, h, n, d)
        return self._sliced_scores_times_values(q, k, v, self.slice_size).reshape(b, h, n, d)

    @staticmethod
    def _sliced_scores_times_values(q, k, v, step):
        """``_scores_times_values`` over ``step`` rows at a time, the slices concatenated back."""
        parts = [
            CrossAttention._scores_times_values(q[i : i + step], k[i : i + step], v[i : i + step])
            for i in range(0, q.shape[0], step)
        ]
        return parts[0] if len(parts) == 1 else ops.cat(parts, axis=0)

    @staticmethod
    def _scores_times_values(q, k, v):
        """softmax(q k^T) v for (rows, S, D) tensors, the softmax in float32."""
        return ops.bmm(CrossAttention._probabilities(q, k).astype(v.dtype), v)

    @staticmethod
    def _probabilities(q, k):
        """softmax(q k^T) in float32 for (rows, S, D) tensors."""
        return ops.softmax(ops.bmm(q, k.transpose(0, 2, 1)).astype(ms.float32), axis=-1)

    def _flash_attention(self, q, k, v):
        """Ascend fused kernel (fp16 inputs, head size padded to a multiple of 16; zero padding changes nothing)."""
        dtype = q.dtype
        if self.fa_pad:
            pad = (0, self.fa_pad)
            q, k, v = ops.pad(q, pad), ops.pad(k, pad), ops.pad(v, pad)
        if dtype == ms.float32:
            q, k, v = q.astype(ms.float16), k.astype(ms.float16), v.astype(ms.float16)
        out = ops.flash_attention_score(q, k, v, self.heads, scalar_value=self.scale, input_layout="BNSD")
        return out[..., : self.dim_head].astype(dtype)

    def _split_fused_heads(self, y, n: int):
        """(B, S, n*H*D) of ``n`` fused projections -> ``n`` tensors (B, H, S, D): one Split, then each part's usual
        transpose (one 5-D transpose and an Unstack instead made the small LoRA step 8 % slower than no fusion)."""
        return tuple(self._split_heads(part) for part in ops.split(y, y.shape[-1] // n, axis=-1))

    def _project_qkv(self, x):
        """q, k, v of self-attention, each (B, H, S, D), from one fused projection."""
        weights = (self.to_q.weight, self.to_k.weight, self.to_v.weight)
        downs = (self.to_q.lora_down.weight, self.to_k.lora_down.weight, self.to_v.lora_down.weight)
        ups = (self.to_q.lora_up.weight, self.to_k.lora_up.weight, self.to_v.lora_up.weight)
        mults = (self.to_q.lora_mult, self.to_k.lora_mult, self.to_v.lora_mult)
        return self._split_fused_heads(self.fused_qkv(x, weights, downs, ups, mults), 3)

    def _project_kv(self, context):
        """k, v of cross-attention, each (B, H, S, D), from one fused projection of the context."""
        weights = (self.to_k.weight, self.to_v.weight)
        downs = (self.to_k.lora_down.weight, self.to_v.lora_down.weight)
        ups = (self.to_k.lora_up.weight, self.to_v.lora_up.weight)
        mults = (self.to_k.lora_mult, self.to_v.lora_mult)
        k, v = self._split_fused_heads(self.fused_kv(context, weights, downs, ups, mults), 2)
        return k, v

    def construct(self, x, context=None):
        if context is None and self.fused_qkv is not None:
            q, k, v = self._project_qkv(x)
        else:
            context = x if context is None else context
            q = self._split_heads(self.to_q(x))
            if self.fused_kv is not None:
                k, v = self._project_kv(context)
            else:
                k = self._split_heads(self.to_k(context))
                v = self._split_heads(self.to_v(context))
        if self.use_flash:
            out = self._flash_attention(q, k, v)
        else:
            out = self._attention(q, k, v)
        b, h, n, d = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(b, n, h * d)
        return self.to_out(out)


def plan_attention_fusion(network: nn.Cell, enable: bool = True) -> int:
    """:meth:`CrossAttention.plan_fusion` on every attention of ``network``; returns how many projections fuse.

    Opt-in: on MindSpore 2.10's CPU backend the fused LoRA step ran fewer MatMuls, more kernels in all, and was
    not faster (``benchmarks/README.md``, "Fused attention projections"), so training and generation do not call it."""
    fused = 0
    for _, cell in network.cells_and_names():
        if isinstance(cell, CrossAttention):
            cell.plan_fusion(enable)
            fused += (cell.fused_qkv is not None) + (cell.fused_kv is not None)
    return fused


def scores_grad(probs, grad, v, output, bmm_nt):
    """Gradient of the scores S (rows, S_q, S_k) of out = softmax(S) v, given probs = softmax(S) in float32.

    dS = P * (g v^T - rowsum(g * out)) (the row term by FlashAttention's identity, see ``AttentionCore``). The row
    term is subtracted inside the matmul: g gets -rowsum as one more column and v a column of ones, so
    [g, -r] [v, 1]^T = g v^T - r comes out of one GEMM, and no separate pass over the (rows, S_q, S_k) matrix
    subtracts it. Equal to the separate subtraction to float rounding (bit-identical in the train step measured on
    CPU). In float32.
    """
    grad, v = grad.astype(ms.float32), v.astype(ms.float32)
    row = (grad * output.astype(ms.float32)).sum(axis=-1, keepdims=True)
    ones = ops.ones(v.shape[:-1] + (1,), ms.float32)
    return probs * bmm_nt(ops.cat((grad, -row), axis=-1), ops.cat((v, ones), axis=-1))


class AttentionCore(nn.Cell):
    """softmax(q k^T) v over (rows, S, D) tensors (the softmax in float32), with a hand-written backward.

    ``construct`` returns ``(output, probabilities)``; callers use the output. The backward gets both from the
    forward (nothing is recomputed) and takes the softmax's row term from the output instead of the scores:
    sum_j dP_ij P_ij = sum_j P_ij (g_i . v_j) = g_i . out_i, FlashAttention's identity. So the row sums run over
    (rows, S, D) instead of (rows, S, S) and the (rows, S, S) product dP * P is not formed: automatic
    differentiation of the softmax took 12 % of the small LoRA step's kernel time in that reduction alone
    (``benchmarks/README.md``, "Profile of the train step"). ``MemoryEfficientAttention.bprop`` uses the same
    formulas slice by slice; gradients equal automatic differentiation's to float rounding.
    """

    def __init__(self):
        super().__init__()
        self.bmm_nt = ops.BatchMatMul(transpose_b=True)
        self.bmm_tn = ops.BatchMatMul(transpose_a=True)

    def construct(self, q, k, v):
        probs = CrossAttention._probabilities(q, k)
        return ops.bmm(probs.astype(v.dtype), v), probs

    def bprop(self, q, k, v, out, dout):
        output, probs = out
        grad = dout[0]
        dv = self.bmm_tn(probs.astype(v.dtype), grad)
        dscores = scores_grad(probs, grad, v, output, self.bmm_nt).astype(q.dtype)
        return ops.bmm(dscores, k), self.bmm_tn(dscores, q), dv


class MemoryEfficientAttention(nn.Cell):
    """softmax(q k^T) v over (rows, S, D) tensors in slices, keeping no scores for the backward pass.

    A slice is as many (batch x head) rows as fit ``score_budget`` float32 scores (at least one row): one head at
    64x64 latents (4096 x 4096 scores, 64 MiB), all rows at once where the scores are small (cross-attention over 77
    tokens, the inner levels). The forward is ``CrossAttention``'s sliced path. ``bprop`` replaces automatic
    differentiation: it receives q, k, v, the output and its gradient, and per slice recomputes the probabilities
    P = softmax(q k^T) (float32), then dv = P^T g, dP = g v^T, dS = P * (dP - rowsum(g * out)), dq = dS k,
    dk = dS^T q (rowsum(g * out) equals rowsum(dP * P), see ``AttentionCore``). So the backward holds one slice's
    scores and their gradient instead of every row's scores from the forward, at the cost of one more q k^T and
    softmax per slice. In PyNative the forward runs without recording
    (MindSpore runs custom-bprop cells that way); in graph mode the bprop is compiled in place of the derivative.
    """

    def __init__(self, score_budget: int = 4096 * 4096):
        super().__init__()
        self.score_budget = score_budget
        self.bmm_nt = ops.BatchMatMul(transpose_b=True)
        self.bmm_tn = ops.BatchMatMul(transpose_a=True)
        self.softmax = ops.Softmax(axis=-1)

    def _rows_per_slice(self, q, k) -> int:
        rows = self.score_budget // (q.shape[1] * k.shape[1])
        return rows if rows > 0 else 1

    def construct(self, q, k, v):
        return CrossAttention._sliced_scores_times_values(q, k, v, self._rows_per_slice(q, k))

    def bprop(self, q, k, v, out, dout):
        step = self._rows_per_slice(q, k)
        dq, dk, dv = [], [], []
        for i in range(0, q.shape[0], step):
            qi, ki, vi, gi = q[i : i + step], k[i : i + step], v[i : i + step], dout[i : i + step]
            probs = self.softmax(self.bmm_nt(qi, ki).astype(ms.float32))
            dv.append(self.bmm_tn(probs.astype(vi.dtype), gi))
            dscores = scores_grad(probs, gi, vi, out[i : i + step], self.bmm_nt).astype(qi.dtype)
            dq.append(ops.bmm(dscores, ki))
            dk.append(self.bmm_tn(dscores, qi))
        return tuple(ops.cat(g, axis=0) if len(g) > 1 else g[0] for g in (dq, dk, dv))


class GEGLU(nn.Cell):
    """Gated GELU: ``a * gelu(b)`` where ``[a, b] = proj(x)`` (exact erf GELU, as torch's default)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def construct(self, x):
        a, gate = ops.chunk(self.proj(x), 2, axis=-1)
        return a * ops.gelu(gate, approximate="none")


class FeedForward(nn.Cell):
    """GEGLU MLP ``net = [GEGLU, Dropout, Linear]`` with hidden width ``mult * dim``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.SequentialCell([GEGLU(dim, inner_dim), nn.Dropout(p=dropout), Linear(inner_dim, dim)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual connection."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        enable_flash_attention: bool = False,
        attention_slice_size: int = 0,
        upcast_attention: bool = False,
    ):
        super().__init__()
        attn = (dropout, enable_flash_attention, attention_slice_size, upcast_attention)
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, *attn)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, *attn)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)

    def construct(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Cell):
    """Transformer over the pixels of a feature map, conditioned on ``context``.

    ``proj_in``/``proj_out`` are 1x1 convolutions (SD 1.x) or Linear layers on the flattened tokens (SD 2.x,
    ``use_linear=True``); the two are the same map with differently shaped weights.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear: bool = False,
        enable_flash_attention: bool = False,
        attention_slice_size: int = 0,
        upcast_attention: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"transformer depth must be >= 1, got {depth}")
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = GroupNorm(32, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = Linear(in_channels, inner_dim)
            self.proj_out = Linear(inner_dim, in_channels)
        else:
            self.proj_in = Conv2d(in_channels, inner_dim, 1)
            self.proj_out = Conv2d(inner_dim, in_channels, 1)
        self.transformer_blocks = nn.CellList(
            [
                BasicTransformerBlock(
                    inner_dim,
                    n_heads,
                    d_head,
                    dropout,
                    context_dim,
                    enable_flash_attention,
                    attention_slice_size,
                    upcast_attention,
                )
                for _ in range(depth)
            ]
        )

    def construct(self, x, emb=None, context=None):
        """``emb`` is accepted and ignored so every UNet block shares the ``(x, emb, context)`` signature."""
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        c = x.shape[1]
        x = x.reshape(b, c, h * w).transpose(0, 2, 1)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(0, 2, 1).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
