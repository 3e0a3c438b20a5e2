"""Stable Diffusion UNet (``openaimodel.UNetModel`` of CompVis/Stability LDM) in MindSpore.

Cell and parameter names match the original checkpoints under ``model.diffusion_model.``: ``time_embed.0/.2``,
``input_blocks.k.j``, ``middle_block.0/1/2``, ``output_blocks.k.j``, ``out.0/.2``; ResBlocks use ``in_layers``,
``emb_layers``, ``out_layers`` and ``skip_connection``. Norms and the attention softmax compute in float32 whatever the
``dtype`` of the Dense/Conv layers.
"""

from __future__ import annotations

import math
from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ldm.models.attention import CrossAttention, SpatialTransformer
from ldm.models.layers import Conv2d, GroupNorm, Linear

SD1_UNET_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=(4, 2, 1),
    num_res_blocks=2,
    channel_mult=(1, 2, 4, 4),
    num_heads=8,
    context_dim=768,
)
"""Stable Diffusion 1.x (``v1-inference.yaml``)."""

SD2_UNET_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=(4, 2, 1),
    num_res_blocks=2,
    channel_mult=(1, 2, 4, 4),
    num_head_channels=64,
    context_dim=1024,
    use_linear_in_transformer=True,
)
"""Stable Diffusion 2.x (``v2-inference.yaml``; the same network serves eps and v prediction)."""

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def resolve_dtype(dtype) -> ms.Type:
    """Accept a MindSpore float type or its name ("float32", "float16", "bfloat16")."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return dtype


def timestep_frequencies(dim: int, max_period: float = 10000.0) -> np.ndarray:
    """``exp(-ln(max_period) * i / (dim/2))`` for ``i < dim/2``, in float32 and in LDM's order of operations."""
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent).astype(np.float32)


class TimestepEmbedSequential(nn.SequentialCell):
    """Runs its blocks in order: a bare conv (``input_blocks.0.0``) takes ``x``; the UNet blocks take
    ``(x, emb, context)`` and ignore what they do not use."""

    def construct(self, x, emb, context):
        for cell in self.cell_list:
            if isinstance(cell, nn.Conv2d):
                x = cell(x)
            else:
                x = cell(x, emb, context)
        return x


class ResBlock(nn.Cell):
    """GroupNorm-SiLU-Conv twice, with the timestep embedding added in between and a residual skip."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.SequentialCell(
            [GroupNorm(32, channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)]
        )
        self.emb_layers = nn.SequentialCell([nn.SiLU(), Linear(emb_channels, out_channels)])
        self.out_layers = nn.SequentialCell(
            [
                GroupNorm(32, out_channels),
                nn.SiLU(),
                nn.Dropout(p=dropout),
                Conv2d(out_channels, out_channels, 3, padding=1),
            ]
        )
        self.skip_connection = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)

    def construct(self, x, emb, context=None):
        h = self.in_layers(x)
        e = self.emb_layers(emb)
        h = h + e.reshape(e.shape + (1, 1))
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Cell):
    """Halve the resolution: stride-2 3x3 conv ``op`` (or 2x2 average pooling without ``use_conv``)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.op = Conv2d(channels, channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def construct(self, x, emb=None, context=None):
        return self.op(x)


class Upsample(nn.Cell):
    """Double the resolution by nearest-neighbour repetition, then an optional 3x3 ``conv``."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x, emb=None, context=None):
        h, w = x.shape[2], x.shape[3]
        x = ops.interpolate(x, size=(2 * h, 2 * w), mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class UNetModel(nn.Cell):
    """Noise (eps) or velocity predictor ``construct(x, timesteps, context) -> tensor shaped like x``.

    Arguments follow LDM's ``openaimodel.UNetModel``. ``attention_resolutions`` are downsampling factors (1, 2, 4, ...)
    at which SpatialTransformers are inserted. Give exactly one of ``num_heads`` (SD 1.x: 8 heads everywhere) or
    ``num_head_channels`` (SD 2.x: 64 channels per head). ``legacy`` is accepted for config compatibility; it only
    changes head sizes that do not divide the channels evenly, which are rejected here. ``use_checkpoint`` (LDM's
    name; mindone's training option is ``use_recompute``) recomputes each block in the backward pass to save
    activation memory, see ``enable_recompute``. ``dtype`` is the compute dtype of Dense/Conv layers; parameters stay
    float32. ``enable_flash_attention`` takes effect on Ascend only. ``attention_slice_size`` > 0 computes attention
    scores for that many (batch x head) rows at a time (same output, smaller workspace; see ``attention.py``).
    ``upcast_attention`` (SD2.1's and diffusers' name) computes q k^T in float32 when the UNet runs in fp16/bf16.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        attention_resolutions: Sequence[int],
        num_res_blocks: int,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        dropout: float = 0.0,
        conv_resample: bool = True,
        num_heads: int = -1,
        num_head_channels: int = -1,
        use_spatial_transformer: bool = True,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        use_linear_in_transformer: bool = False,
        legacy: bool = False,
        use_checkpoint: bool = False,
        dtype=ms.float32,
        enable_flash_attention: bool = False,
        attention_slice_size: int = 0,
        upcast_attention: bool = False,
    ):
        super().__init__()
        channel_mult = tuple(channel_mult)
        attention_resolutions = tuple(attention_resolutions)
        self._check_args(
            model_channels,
            attention_resolutions,
            num_res_blocks,
            channel_mult,
            num_heads,
            num_head_channels,
            use_spatial_transformer,
            transformer_depth,
            context_dim,
        )
        self.compute_dtype = resolve_dtype(dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.time_freqs = ms.Tensor(timestep_frequencies(model_channels))
        time_embed_dim = model_channels * 4
        self.time_embed = nn.SequentialCell(
            [Linear(model_channels, time_embed_dim), nn.SiLU(), Linear(time_embed_dim, time_embed_dim)]
        )

        def transformer(ch: int) -> SpatialTransformer:
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                transformer_depth,
                dropout,
                context_dim,
                use_linear_in_transformer,
                enable_flash_attention,
                attention_slice_size,
                upcast_attention,
            )

        blocks = [TimestepEmbedSequential([Conv2d(in_channels, model_channels, 3, padding=1)])]
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, time_embed_dim, dropout, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                blocks.append(TimestepEmbedSequential(layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                blocks.append(TimestepEmbedSequential([Downsample(ch, conv_resample)]))
                skip_chans.append(ch)
                ds *= 2
        self.input_blocks = nn.CellList(blocks)
        self.middle_block = TimestepEmbedSequential(
            [ResBlock(ch, time_embed_dim, dropout), transformer(ch), ResBlock(ch, time_embed_dim, dropout)]
        )
        blocks = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), time_embed_dim, dropout, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(layers))
        self.output_blocks = nn.CellList(blocks)
        self.out = nn.SequentialCell([GroupNorm(32, ch), nn.SiLU(), Conv2d(model_channels, out_channels, 3, padding=1)])

        if self.compute_dtype != ms.float32:
            for _, cell in self.cells_and_names():
                if isinstance(cell, (nn.Dense, nn.Conv2d)):
                    cell.to_float(self.compute_dtype)
        self.recompute_enabled = False
        if use_checkpoint:
            self.enable_recompute()

    def enable_recompute(self) -> None:
        """Keep only each block's input for the backward pass and recompute the block's activations there.

        Applies ``Cell.recompute`` to every input, middle and output block (graph mode and PyNative alike). The
        gradients are the same computation done twice, so they are unchanged; a training step costs about one more
        forward pass. MindSpore allows it once per Cell, so a second call does nothing.
        """
        if self.recompute_enabled:
            return
        for block in (*self.input_blocks, self.middle_block, *self.output_blocks):
            block.recompute()
        self.recompute_enabled = True

    def set_attention_slice_size(self, slice_size: int) -> None:
        """Set every attention's slice size (0: no slicing); takes effect before a graph is compiled, or eagerly."""
        if slice_size < 0:
            raise ValueError(f"attention_slice_size must be >= 0 (0: no slicing), got {slice_size}")
        for _, cell in self.cells_and_names():
            if isinstance(cell, CrossAttention):
                cell.slice_size = int(slice_size)

    def set_memory_efficient_attention(self, enable: bool) -> None:
        """Every attention computes in slices with a backward that recomputes the scores (``MemoryEfficientAttention``):
        the training-time saver for 64x64 latents, where one head's scores are 64 MiB. Off: the plain path."""
        for cell in [c for _, c in self.cells_and_names() if isinstance(c, CrossAttention)]:
            cell.set_memory_efficient(enable)

    @staticmethod
    def _check_args(
        model_channels,
        attention_resolutions,
        num_res_blocks,
        channel_mult,
        num_heads,
        num_head_channels,
        use_spatial_transformer,
        transformer_depth,
        context_dim,
    ) -> None:
        """Reject configurations the network cannot be built from, naming the offending argument."""
        if not use_spatial_transformer:
            raise ValueError("use_spatial_transformer=False (AttentionBlock-only UNets) is not supported")
        if context_dim is None:
            raise ValueError("context_dim is required: SpatialTransformer cross-attends to the text embedding")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError(
                f"give exactly one of num_heads and num_head_channels, got num_heads={num_heads}, "
                f"num_head_channels={num_head_channels}"
            )
        if (num_heads != -1 and num_heads < 1) or (num_head_channels != -1 and num_head_channels < 1):
            raise ValueError(f"num_heads/num_head_channels must be positive, got {num_heads}/{num_head_channels}")
        if not channel_mult:
            raise ValueError("channel_mult must not be empty")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if transformer_depth < 1:
            raise ValueError(f"transformer_depth must be >= 1, got {transformer_depth}")
        factors = [2**level for level in range(len(channel_mult))]
        unknown = [r for r in attention_resolutions if r not in factors]
        if unknown:
            raise ValueError(
                f"attention_resolutions {list(attention_resolutions)} must be downsampling factors of the levels "
                f"{factors}; {unknown} match no level"
            )
        for level, mult in enumerate(channel_mult):
            ch = mult * model_channels
            if ch % 32:
                raise ValueError(f"channels {ch} of level {level} are not divisible by the 32 GroupNorm groups")
            if 2**level not in attention_resolutions and level != len(channel_mult) - 1:
                continue
            divisor = num_heads if num_head_channels == -1 else num_head_channels
            if ch % divisor:
                raise ValueError(
                    f"channels {ch} of level {level} are not divisible by "
                    f"{'num_heads' if num_head_channels == -1 else 'num_head_channels'}={divisor}"
                )

    def timestep_embedding(self, timesteps):
        """Sinusoidal embedding ``[cos(t f), sin(t f)]`` of shape (B, model_channels) as in LDM."""
        args = timesteps.astype(ms.float32).reshape(-1, 1) * self.time_freqs.reshape(1, -1)
        return ops.cat([ops.cos(args), ops.sin(args)], axis=-1)

    def construct(self, x, timesteps, context):
        """x (B, C, H, W); timesteps (B,), (1,) or scalar; context (B, L, context_dim)."""
        timesteps = ops.broadcast_to(timesteps.reshape(-1), (x.shape[0],))
        emb = self.time_embed(self.timestep_embedding(timesteps))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        i = len(hs)
        for block in self.output_blocks:
            i -= 1
            h = ops.cat((h, hs[i]), axis=1)
            h = block(h, emb, context)
        return self.out(h).astype(x.dtype)
