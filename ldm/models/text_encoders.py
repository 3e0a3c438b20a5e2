"""CLIP text encoders of Stable Diffusion: SD1's OpenAI CLIP ViT-L/14 and SD2's OpenCLIP ViT-H/14.

Parameter names are those of the original LDM ``cond_stage_model`` so Stability checkpoints load without renaming:

* :class:`FrozenCLIPEmbedder` (SD1) holds a transformers-named ``CLIPTextModel`` as ``transformer``:
  ``transformer.text_model.{embeddings, encoder.layers.{i}, final_layer_norm}.*``.
* :class:`FrozenOpenCLIPEmbedder` (SD2) holds open_clip names under ``model``: ``token_embedding.weight``,
  ``positional_embedding``, ``transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc,
  mlp.c_proj}``, ``ln_final``. Stability's embedder (``layer="penultimate"``) returns ``ln_final`` of the output of
  block 22 of 24; we build only the 23 blocks used (``layers=23``), like diffusers' SD2 text encoder.
  ``ldm.io.text_encoder_keys.checkpoint_ignored_keys("sd2")`` lists the checkpoint keys this leaves unused.

Both are pre-LayerNorm transformers with causal self-attention over 77 positions. Each model returns the
final-LayerNormed hidden states and a pooled vector: the hidden state at the first ``<|endoftext|>`` (id 49407), the
rule transformers applies for configs with ``eos_token_id=49407``. Configs with the legacy ``eos_token_id=2`` (e.g.
openai/clip-vit-large-patch14) take the argmax id instead; for ids from :class:`ldm.tokenizer.CLIPTokenizer` that is
the same position, since 49407 is the largest id and padding is 49407 (SD1) or 0 (SD2). A row without the end
token pools its last position. ``dtype`` is the compute dtype of the Dense layers; norms and softmax run in float32.
"""

from __future__ import annotations

from functools import lru_cache

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from ldm.models.layers import Embedding, LayerNorm, Linear
from ldm.models.unet import resolve_dtype
from ldm.tokenizer import EOT_ID, CLIPTokenizer

ACTIVATIONS = ("quick_gelu", "gelu")


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * ops.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: ops.gelu(x, approximate="none")
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {name!r}")


def _causal_mask(n: int) -> Tensor:
    """Additive float32 mask [n, n]: -inf above the diagonal, so position i attends to positions <= i."""
    return Tensor(np.triu(np.full((n, n), -np.inf, np.float32), 1))


def _attend(q, k, v, heads: int, mask):
    """Causal multi-head attention over [B, L, W] projections; scores and softmax in float32."""
    b, n, w = q.shape
    d = w // heads
    q = (q * d**-0.5).reshape(b, n, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, n, d)
    k = k.reshape(b, n, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, n, d)
    v = v.reshape(b, n, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, n, d)
    scores = ops.bmm(q, k.transpose(0, 2, 1)).astype(ms.float32) + mask[:n, :n]
    attn = ops.softmax(scores, axis=-1).astype(v.dtype)
    return ops.bmm(attn, v).reshape(b, heads, n, d).transpose(0, 2, 1, 3).reshape(b, n, w)


def _pool_eos(hidden, ids, eos_token_id: int):
    """Hidden state [B, W] at the first ``eos_token_id`` of each row (the last position if there is none)."""
    n = ids.shape[1]
    positions = ops.arange(n, dtype=ms.int32).reshape(1, n).broadcast_to(ids.shape)
    first = ops.where(ids == eos_token_id, positions, n - 1).min(axis=-1)
    return ops.gather(hidden, first, 1, batch_dims=1)


def _check_shape(width: int, heads: int) -> None:
    if heads < 1 or width % heads:
        raise ValueError(f"width {width} must be a positive multiple of heads {heads}")


def _set_compute_dtype(cell: nn.Cell, dtype) -> None:
    """Run every Dense layer (and the fused open_clip input projection) of ``cell`` in ``dtype``."""
    if dtype == ms.float32:
        return
    for _, sub in cell.cells_and_names():
        if isinstance(sub, nn.Dense):
            sub.to_float(dtype)
        elif isinstance(sub, OpenCLIPAttention):
            sub.dtype = dtype


class CLIPAttention(nn.Cell):
    """transformers ``CLIPAttention``: separate ``q_proj``/``k_proj``/``v_proj``/``out_proj``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        _check_shape(width, heads)
        self.heads = heads
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def construct(self, x, mask):
        return self.out_proj(_attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask))


class CLIPMLP(nn.Cell):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)
        self.act = _activation(act)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = LayerNorm(width, eps)
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm2 = LayerNorm(width, eps)
        self.mlp = CLIPMLP(width, hidden, act)

    def construct(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask).astype(x.dtype)
        return x + self.mlp(self.layer_norm2(x)).astype(x.dtype)


class CLIPEmbeddings(nn.Cell):
    def __init__(self, vocab_size: int, width: int, max_positions: int):
        super().__init__()
        self.token_embedding = Embedding(vocab_size, width)
        self.position_embedding = Embedding(max_positions, width)

    def construct(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Cell):
    def __init__(self, width: int, layers: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(width, heads, hidden, act, eps) for _ in range(layers)])

    def construct(self, x, mask, skip: int = 0):
        for i in range(len(self.layers) - skip):
            x = self.layers[i](x, mask)
        return x


class CLIPTextTransformer(nn.Cell):
    """transformers ``CLIPTextTransformer`` (the ``text_model`` of ``CLIPTextModel``).

    construct(ids int [B, L<=max_positions], skip) -> (last_hidden_state [B, L, width] after ``final_layer_norm``,
    pooled [B, width] at the first ``eos_token_id``); ``skip`` (a Python int, so graph mode compiles each value)
    leaves out the last ``skip`` layers (:func:`check_clip_skip`). ``mlp_dim`` defaults to ``4 * width``.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        max_positions: int = 77,
        act: str = "quick_gelu",
        eps: float = 1e-5,
        mlp_dim: int | None = None,
        eos_token_id: int = EOT_ID,
        dtype=ms.float32,
    ):
        super().__init__()
        _check_shape(width, heads)
        self.eos_token_id = eos_token_id
        self.embeddings = CLIPEmbeddings(vocab_size, width, max_positions)
        self.encoder = CLIPEncoder(width, layers, heads, mlp_dim or 4 * width, act, eps)
        self.final_layer_norm = LayerNorm(width, eps)
        self.mask = _causal_mask(max_positions)
        _set_compute_dtype(self, resolve_dtype(dtype))

    def construct(self, ids, skip: int = 0):
        hidden = self.final_layer_norm(self.encoder(self.embeddings(ids), self.mask, skip))
        return hidden, _pool_eos(hidden, ids, self.eos_token_id)


class CLIPTextModel(nn.Cell):
    """Holds :class:`CLIPTextTransformer` as ``text_model``, as transformers' ``CLIPTextModel`` does."""

    def __init__(self, **kwargs):
        super().__init__()
        self.text_model = CLIPTextTransformer(**kwargs)

    def construct(self, ids, skip: int = 0):
        return self.text_model(ids, skip)


class OpenCLIPAttention(nn.Cell):
    """``torch.nn.MultiheadAttention`` names: fused ``in_proj_weight`` [3W, W] (q, k, v rows) and ``out_proj``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        _check_shape(width, heads)
        self.heads = heads
        self.dtype = ms.float32  # compute dtype of the fused projection, set by _set_compute_dtype
        self.in_proj_weight = Parameter(
            initializer("xavier_uniform", (3 * width, width), ms.float32), name="in_proj_weight"
        )
        self.in_proj_bias = Parameter(initializer("zeros", (3 * width,), ms.float32), name="in_proj_bias")
        self.out_proj = Linear(width, width)
        self.in_proj_lora = None  # set by ldm.lora.inject_lora: a low-rank delta added to the fused projection

    def construct(self, x, mask):
        w, b = self.in_proj_weight.astype(self.dtype), self.in_proj_bias.astype(self.dtype)
        qkv = ops.dense(x.astype(self.dtype), w, b)
        if self.in_proj_lora is not None:
            qkv = qkv + self.in_proj_lora(x).astype(qkv.dtype)
        q, k, v = ops.split(qkv, x.shape[-1], axis=-1)
        return self.out_proj(_attend(q, k, v, self.heads, mask))


class OpenCLIPMLP(nn.Cell):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.c_fc = Linear(width, hidden)
        self.c_proj = Linear(hidden, width)
        self.act = _activation(act)

    def construct(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Cell):
    """open_clip block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps)
        self.attn = OpenCLIPAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps)
        self.mlp = OpenCLIPMLP(width, hidden, act)

    def construct(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask).astype(x.dtype)
        return x + self.mlp(self.ln_2(x)).astype(x.dtype)


class OpenCLIPTransformer(nn.Cell):
    def __init__(self, width: int, layers: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(width, heads, hidden, act, eps) for _ in range(layers)])

    def construct(self, x, mask, skip: int = 0):
        for i in range(len(self.resblocks) - skip):
            x = self.resblocks[i](x, mask)
        return x


class OpenCLIPTextModel(nn.Cell):
    """open_clip ``CLIP`` text tower without ``text_projection``/``logit_scale``; returns ``ln_final`` of the last
    built block (or of the block ``skip`` before it) and the pooled vector, like :class:`CLIPTextTransformer`."""

    def __init__(
        self,
        vocab_size: int = 49408,
        width: int = 1024,
        layers: int = 23,
        heads: int = 16,
        max_positions: int = 77,
        act: str = "gelu",
        eps: float = 1e-5,
        mlp_dim: int | None = None,
        eos_token_id: int = EOT_ID,
        dtype=ms.float32,
    ):
        super().__init__()
        _check_shape(width, heads)
        self.eos_token_id = eos_token_id
        self.token_embedding = Embedding(vocab_size, width)
        self.positional_embedding = Parameter(
            initializer(Normal(0.01), (max_positions, width), ms.float32), name="positional_embedding"
        )
        self.transformer = OpenCLIPTransformer(width, layers, heads, mlp_dim or 4 * width, act, eps)
        self.ln_final = LayerNorm(width, eps)
        self.mask = _causal_mask(max_positions)
        _set_compute_dtype(self, resolve_dtype(dtype))

    def construct(self, ids, skip: int = 0):
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        hidden = self.ln_final(self.transformer(x, self.mask, skip))
        return hidden, _pool_eos(hidden, ids, self.eos_token_id)


@lru_cache(maxsize=8)
def _tokenizer(family: str, bpe_path: str | None, context_length: int) -> CLIPTokenizer:
    return CLIPTokenizer.for_family(family, bpe_path, context_length)


def check_clip_skip(clip_skip: int, layers: int) -> int:
    """``clip_skip`` if the encoder has layers left after skipping that many (diffusers' ``clip_skip``: 1 takes the
    output of the layer before the last, through the final LayerNorm); raises ValueError naming the limit."""
    if not 0 <= clip_skip < layers:
        raise ValueError(f"clip_skip {clip_skip} must be in [0, {layers - 1}] for this {layers}-layer text encoder")
    return clip_skip


class _TextEmbedder(nn.Cell):
    """What both embedders share: the family's tokenizer, the context width and ``clip_skip``.

    construct(ids int [B, max_length], clip_skip=0) -> context [B, max_length, width]; ``clip_skip`` k returns the
    final LayerNorm of the output of layer ``layers - k`` instead of the last one (a Python int: graph mode compiles
    one graph per value)."""

    family = ""

    def __init__(self, width: int, layers: int, max_length: int, bpe_path: str | None):
        super().__init__()
        self.context_dim = width
        self.layers = layers
        self.max_length = max_length
        self.bpe_path = bpe_path

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return _tokenizer(self.family, self.bpe_path, self.max_length)

    def tokenize(self, texts) -> np.ndarray:
        """int32 [B, max_length] ids with this family's padding."""
        return self.tokenizer(texts)


class FrozenCLIPEmbedder(_TextEmbedder):
    """SD1 text encoder (OpenAI CLIP ViT-L/14 defaults): ids int [B, 77] -> context [B, 77, width], the last hidden
    state after ``final_layer_norm``. Parameters: ``transformer.text_model.*``. ``tokenize`` pads with
    ``<|endoftext|>``."""

    family = "sd1"

    def __init__(
        self,
        vocab_size: int = 49408,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        max_length: int = 77,
        act: str = "quick_gelu",
        eps: float = 1e-5,
        dtype=ms.float32,
        bpe_path: str | None = None,
    ):
        super().__init__(width, layers, max_length, bpe_path)
        self.transformer = CLIPTextModel(
            vocab_size=vocab_size,
            width=width,
            layers=layers,
            heads=heads,
            max_positions=max_length,
            act=act,
            eps=eps,
            dtype=dtype,
        )

    def construct(self, ids, clip_skip: int = 0):
        return self.transformer(ids, clip_skip)[0]


class FrozenOpenCLIPEmbedder(_TextEmbedder):
    """SD2 text encoder (OpenCLIP ViT-H/14 defaults, 23 of its 24 blocks): ids int [B, 77] -> context
    [B, 77, width] = ``ln_final`` of the penultimate block's output (Stability's ``layer="penultimate"``).
    Parameters: ``model.*`` in open_clip names. ``tokenize`` pads with 0.

    SD2 was trained on that penultimate layer, so ``clip_skip=0`` is already what the WebUI calls "CLIP skip 2" on
    SD1. ``clip_skip`` k skips k more: the output of block ``22 - k`` of the 24 (0-based), through ``ln_final`` --
    what diffusers' ``clip_skip`` k does on an SD2 folder, whose text encoder also holds the 23 blocks."""

    family = "sd2"

    def __init__(
        self,
        vocab_size: int = 49408,
        width: int = 1024,
        layers: int = 23,
        heads: int = 16,
        max_length: int = 77,
        act: str = "gelu",
        eps: float = 1e-5,
        dtype=ms.float32,
        bpe_path: str | None = None,
    ):
        super().__init__(width, layers, max_length, bpe_path)
        self.model = OpenCLIPTextModel(
            vocab_size=vocab_size,
            width=width,
            layers=layers,
            heads=heads,
            max_positions=max_length,
            act=act,
            eps=eps,
            dtype=dtype,
        )

    def construct(self, ids, clip_skip: int = 0):
        return self.model(ids, clip_skip)[0]
