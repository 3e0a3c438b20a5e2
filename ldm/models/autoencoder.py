"""Stable Diffusion's KL autoencoder (``first_stage_model``) with original-LDM parameter names.

Module layout and names follow CompVis/Stability (``encoder.down.{i}.block.{j}``, ``mid.attn_1.q``,
``decoder.up.{i}.upsample.conv``, ``quant_conv``...), so a Stability checkpoint's ``first_stage_model.*`` tensors
load without renaming; :mod:`ldm.io.vae_keys` maps diffusers names onto these. Norms and the attention softmax
compute in float32 whatever ``dtype`` the convolutions use.

Two memory options of ``decode`` mirror diffusers' ``enable_vae_slicing``/``enable_vae_tiling``: slicing decodes a
batch one latent at a time (the same image, one image's activations at a time); tiling decodes overlapping latent
tiles and blends their overlaps linearly. Tiling changes the image: the decoder's GroupNorm statistics and its
mid-block attention then see one tile instead of the whole latent, so tiles can differ slightly in tone and seams
are smoothed, not avoided. Both are off by default.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ldm.models.layers import Conv2d, GroupNorm
from ldm.models.unet import resolve_dtype

# ``ddconfig`` keys of Stability's configs; the last two have LDM's defaults.
DDCONFIG_REQUIRED = (
    "z_channels",
    "resolution",
    "in_channels",
    "out_ch",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
)
DDCONFIG_OPTIONAL = {"double_z": True, "dropout": 0.0}
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
TILE_OVERLAP = 0.25  # fraction of a tile shared with its neighbour, as diffusers' tile_overlap_factor


def Normalize(channels: int) -> GroupNorm:
    """LDM's normalisation: 32 groups, eps 1e-6."""
    return GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Cell):
    """norm-SiLU-conv twice plus a residual (a 1x1 ``nin_shortcut`` when channels change); no time embedding."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.has_shortcut = in_channels != out_channels
        if self.has_shortcut:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1)

    def construct(self, x):
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(self.dropout(ops.silu(self.norm2(h))))
        if self.has_shortcut:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over all pixels with 1x1-conv projections ``q``/``k``/``v``/``proj_out``."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)
        self.scale = channels**-0.5

    def construct(self, x):
        b, c, height, width = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, height * width).transpose(0, 2, 1).astype(ms.float32)
        k = self.k(h).reshape(b, c, height * width).astype(ms.float32)
        v = self.v(h).reshape(b, c, height * width)
        weights = ops.softmax(ops.bmm(q, k) * self.scale, axis=-1).astype(v.dtype)  # [b, query, key]
        h = ops.bmm(v, weights.transpose(0, 2, 1)).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Cell):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (LDM's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Cell):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x):
        b, c, height, width = x.shape
        x = ops.tile(x.reshape(b, c, height, 1, width, 1), (1, 1, 1, 2, 1, 2))
        return self.conv(x.reshape(b, c, 2 * height, 2 * width))


class Level(nn.Cell):
    """One resolution level: ``block.{j}`` resnets, each followed by ``attn.{j}`` when the level attends."""

    def __init__(self, blocks: list, attns: list):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.attn = nn.CellList(attns)
        self.has_attn = bool(attns)

    def run_blocks(self, x):
        for j in range(len(self.block)):
            x = self.block[j](x)
            if self.has_attn:
                x = self.attn[j](x)
        return x


class DownLevel(Level):
    """Encoder level ``down.{i}``: blocks, then ``downsample`` on all but the last level."""

    def __init__(self, blocks: list, attns: list, channels: int, resample: bool):
        super().__init__(blocks, attns)
        self.has_resample = resample
        if resample:
            self.downsample = Downsample(channels)

    def construct(self, x):
        x = self.run_blocks(x)
        if self.has_resample:
            x = self.downsample(x)
        return x


class UpLevel(Level):
    """Decoder level ``up.{i}``: blocks, then ``upsample`` on all but level 0."""

    def __init__(self, blocks: list, attns: list, channels: int, resample: bool):
        super().__init__(blocks, attns)
        self.has_resample = resample
        if resample:
            self.upsample = Upsample(channels)

    def construct(self, x):
        x = self.run_blocks(x)
        if self.has_resample:
            x = self.upsample(x)
        return x


class MidBlock(nn.Cell):
    """``block_1`` - ``attn_1`` - ``block_2`` at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def construct(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Cell):
    """Image [B, in_channels, H, W] -> moments [B, 2*z_channels (double_z) or z_channels, H/f, W/f]."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult,
        num_res_blocks: int,
        attn_resolutions,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv_in = Conv2d(in_channels, ch, 3, padding=1)
        levels = []
        block_in, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            last = i == len(ch_mult) - 1
            levels.append(DownLevel(blocks, attns, block_in, not last))
            res = res if last else res // 2
        self.down = nn.CellList(levels)
        self.mid = MidBlock(block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(ops.silu(self.norm_out(h)))


class Decoder(nn.Cell):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f]; ``up.{i}`` is indexed like the encoder's levels
    (``up.0`` is full resolution) and runs from the last index to the first."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult,
        num_res_blocks: int,
        attn_resolutions,
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (n - 1)
        self.conv_in = Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout)
        levels = [None] * n
        for i in reversed(range(n)):
            block_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            levels[i] = UpLevel(blocks, attns, block_in, i > 0)
            res = res * 2 if i else res
        self.up = nn.CellList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv2d(block_in, out_ch, 3, padding=1)

    def construct(self, z):
        h = self.mid(self.conv_in(z))
        for i in range(len(self.up) - 1, -1, -1):
            h = self.up[i](h)
        return self.conv_out(ops.silu(self.norm_out(h)))


def _blend_rows(above: np.ndarray, below: np.ndarray, extent: int) -> np.ndarray:
    """Fade the first ``extent`` rows of ``below`` in from the last rows of ``above`` (linear weights)."""
    extent = min(extent, above.shape[2], below.shape[2])
    w = (np.arange(extent, dtype=np.float32) / extent).reshape(1, 1, -1, 1)
    out = below.copy()
    out[:, :, :extent] = above[:, :, above.shape[2] - extent :] * (1.0 - w) + below[:, :, :extent] * w
    return out


def _blend_cols(left: np.ndarray, right: np.ndarray, extent: int) -> np.ndarray:
    """Fade the first ``extent`` columns of ``right`` in from the last columns of ``left``."""
    return _blend_rows(left.transpose(0, 1, 3, 2), right.transpose(0, 1, 3, 2), extent).transpose(0, 1, 3, 2)


def check_ddconfig(ddconfig: dict) -> dict:
    """Return ``ddconfig`` with LDM's defaults filled in; unknown or missing keys raise ValueError naming them."""
    valid = set(DDCONFIG_REQUIRED) | set(DDCONFIG_OPTIONAL)
    for key in ddconfig:
        if key not in valid:
            raise ValueError(f"ddconfig: unknown key {key!r} (valid: {', '.join(sorted(valid))})")
    for key in DDCONFIG_REQUIRED:
        if key not in ddconfig:
            raise ValueError(f"ddconfig: missing key {key!r}")
    cfg = {**DDCONFIG_OPTIONAL, **ddconfig}
    if not cfg["double_z"]:
        raise ValueError("ddconfig: double_z must be true for a KL autoencoder (the encoder predicts mean and logvar)")
    return cfg


def sample_latent(mean: Tensor, logvar: Tensor, noise: Tensor) -> Tensor:
    """Reparameterised posterior sample ``mean + exp(logvar / 2) * noise`` (noise ~ N(0, I))."""
    return mean + ops.exp(0.5 * logvar) * noise


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over C, H, W as LDM's DiagonalGaussian does."""
    return 0.5 * (ops.square(mean) + ops.exp(logvar) - 1.0 - logvar).sum(axis=(1, 2, 3))


class AutoencoderKL(nn.Cell):
    """KL-regularised autoencoder: ``encode`` gives the diagonal-Gaussian posterior, ``decode`` maps latents back.

    ddconfig: Stability's ``ddconfig`` (double_z, z_channels, resolution, in_channels, out_ch, ch, ch_mult,
    num_res_blocks, attn_resolutions, dropout). embed_dim: latent channels. dtype: compute dtype of the convs.
    monitor, lossconfig: training-only entries of Stability's ``first_stage_config``, accepted so those configs
    build unchanged and otherwise ignored (no discriminator/loss lives here).
    """

    def __init__(
        self,
        ddconfig: dict,
        embed_dim: int,
        dtype=ms.float32,
        monitor: str | None = None,
        lossconfig: dict | None = None,
    ):
        super().__init__()
        cfg = check_ddconfig(dict(ddconfig))
        common = {k: cfg[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "dropout")}
        self.encoder = Encoder(in_channels=cfg["in_channels"], z_channels=cfg["z_channels"], double_z=True, **common)
        self.decoder = Decoder(out_ch=cfg["out_ch"], z_channels=cfg["z_channels"], **common)
        self.quant_conv = Conv2d(2 * cfg["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = Conv2d(embed_dim, cfg["z_channels"], 1)
        self.embed_dim = int(embed_dim)
        self.dtype = dtype = resolve_dtype(dtype)
        self.latent_factor = 2 ** (len(cfg["ch_mult"]) - 1)
        self.slice_decode = False
        self.tile_latent_size = 0
        if dtype != ms.float32:
            for _, cell in self.cells_and_names():
                if isinstance(cell, nn.Conv2d):
                    cell.to_float(dtype)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image in [-1, 1] -> float32 (mean, logvar) of the posterior, logvar clamped to [-30, 20] as in LDM."""
        moments = self.quant_conv(self.encoder(x.astype(self.dtype))).astype(ms.float32)
        mean, logvar = ops.split(moments, self.embed_dim, axis=1)
        return mean, ops.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def set_decode_memory_options(self, slicing: bool = False, tile_latent_size: int = 0) -> None:
        """slicing: decode one latent of a batch at a time (exact). tile_latent_size > 0: decode latents larger than
        this in overlapping tiles of this many latent pixels (approximate, see the module docstring). Both act when
        ``decode`` is called from Python, as the pipeline does; keep them off inside a compiled ``construct``."""
        if tile_latent_size < 0 or tile_latent_size == 1:
            raise ValueError(f"tile_latent_size must be 0 (off) or >= 2, got {tile_latent_size}")
        self.slice_decode = bool(slicing)
        self.tile_latent_size = int(tile_latent_size)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent -> float32 image (roughly [-1, 1])."""
        tile = self.tile_latent_size
        if tile and (z.shape[2] > tile or z.shape[3] > tile):
            return self._tiled_decode(z)
        if self.slice_decode and z.shape[0] > 1:
            return ops.cat([self._decode(z[i : i + 1]) for i in range(z.shape[0])], axis=0)
        return self._decode(z)

    def _decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(ms.float32)

    def _tiled_decode(self, z: Tensor) -> Tensor:
        """Decode overlapping tiles (stride 3/4 of a tile), blend each into its upper and left neighbours over the
        overlap with linear weights, keep each tile's first ``stride * factor`` pixels (all of the last tile of a
        row or column) and stitch them."""
        tile, f = self.tile_latent_size, self.latent_factor
        stride = max(int(tile * (1.0 - TILE_OVERLAP)), 1)
        blend = tile * f - stride * f
        height, width = z.shape[2], z.shape[3]
        rows = []
        for top in range(0, height, stride):
            row = []
            for left in range(0, width, stride):
                part = self._decode_tile(z[:, :, top : top + tile, left : left + tile])
                if rows:
                    part = _blend_rows(rows[-1][len(row)], part, blend)
                if row:
                    part = _blend_cols(row[-1], part, blend)
                row.append(part)
                if left + tile >= width:
                    break
            rows.append(row)
            if top + tile >= height:
                break
        keep = stride * f  # each tile but the last of a row/column gives way to the next one after this
        stitched = [np.concatenate([p[..., :keep] for p in row[:-1]] + [row[-1]], axis=3) for row in rows]
        image = np.concatenate([r[:, :, :keep] for r in stitched[:-1]] + [stitched[-1]], axis=2)
        return Tensor(image)

    def _decode_tile(self, z: Tensor) -> np.ndarray:
        """One tile as a numpy array, one latent of the batch at a time when slicing is on."""
        if self.slice_decode and z.shape[0] > 1:
            return np.concatenate([self._decode(z[i : i + 1]).asnumpy() for i in range(z.shape[0])], axis=0)
        return self._decode(z).asnumpy()

    def construct(self, x, noise):
        """LDM's forward with a sampled posterior: returns (reconstruction, mean, logvar)."""
        mean, logvar = self.encode(x)
        return self.decode(sample_latent(mean, logvar, noise)), mean, logvar
