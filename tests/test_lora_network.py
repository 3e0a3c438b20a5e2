"""LoRA on whole networks (ldm.lora.network): injection, freezing, adapters in and out, merge/scale all, on small
cell trees that carry the UNet / text-encoder names."""

import logging

import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn, ops

import ldm  # noqa: F401  (must precede mindspore)
from ldm.lora.adapter import modules
from ldm.lora.network import (
    count_lora_parameters,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_all,
    set_lora_scale,
    to_adapter,
    unmerge_all,
)
from ldm.lora.targets import TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS, UNET_EXTENDED_TARGETS
from ldm.models.layers import Conv2d, Linear


# ----------------------------------------------------------------------------------------- UNet-like cell tree
class Attention(nn.Cell):
    def __init__(self, dim, ctx_dim):
        super().__init__()
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(ctx_dim, dim, bias=False)
        self.to_v = Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.SequentialCell([Linear(dim, dim), nn.Dropout(p=0.0)])

    def construct(self, x, ctx):
        attn = ops.softmax(ops.bmm(self.to_q(x), self.to_k(ctx).transpose(0, 2, 1)), axis=-1)
        return self.to_out(ops.bmm(attn, self.to_v(ctx)))


class GEGLU(nn.Cell):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def construct(self, x):
        a, gate = ops.chunk(self.proj(x), 2, axis=-1)
        return a * ops.gelu(gate)


class Block(nn.Cell):
    def __init__(self, dim, ctx_dim):
        super().__init__()
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, ctx_dim)
        self.ff = nn.Cell()
        self.ff.net = nn.SequentialCell([GEGLU(dim, 2 * dim), nn.Dropout(p=0.0), Linear(2 * dim, dim)])

    def construct(self, x, ctx):
        x = self.attn1(x, x) + x
        x = self.attn2(x, ctx) + x
        return self.ff.net(x) + x


class Transformer(nn.Cell):
    """SpatialTransformer stand-in on tokens; ``conv`` makes proj_in/out 1x1 convs as in SD1."""

    def __init__(self, dim, ctx_dim, conv=False):
        super().__init__()
        self.conv = conv
        self.proj_in = Conv2d(dim, dim, 1) if conv else Linear(dim, dim)
        self.transformer_blocks = nn.CellList([Block(dim, ctx_dim)])
        self.proj_out = Conv2d(dim, dim, 1) if conv else Linear(dim, dim)

    def construct(self, x, ctx):
        h = self.proj_in(x) if not self.conv else x
        for block in self.transformer_blocks:
            h = block(h, ctx)
        return (self.proj_out(h) if not self.conv else h) + x


class TinyUNet(nn.Cell):
    def __init__(self, dim=16, ctx_dim=12, conv=False):
        super().__init__()
        self.input_blocks = nn.CellList(
            [
                nn.SequentialCell([Linear(dim, dim)]),
                nn.SequentialCell([Linear(dim, dim), Transformer(dim, ctx_dim, conv)]),
            ]
        )

    def construct(self, x, ctx):
        x = self.input_blocks[0](x)
        return self.input_blocks[1][1](self.input_blocks[1][0](x), ctx)


class DiffusionWrapper(nn.Cell):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


class LatentDiffusion(nn.Cell):
    def __init__(self, conv=False):
        super().__init__()
        self.model = DiffusionWrapper(TinyUNet(conv=conv))

    def construct(self, x, ctx):
        return self.model.diffusion_model(x, ctx)


# ----------------------------------------------------------------------------------- text-encoder-like trees
class HFAttention(nn.Cell):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d) for _ in range(4))

    def construct(self, x):
        attn = ops.softmax(ops.bmm(self.q_proj(x), self.k_proj(x).transpose(0, 2, 1)), axis=-1)
        return self.out_proj(ops.bmm(attn, self.v_proj(x)))


class HFLayer(nn.Cell):
    def __init__(self, d):
        super().__init__()
        self.self_attn = HFAttention(d)

    def construct(self, x):
        return self.self_attn(x)


class OpenClipAttention(nn.Cell):
    """Fused in_proj as raw Parameters, with the ``in_proj_lora`` hook that ldm.lora documents."""

    def __init__(self, d, hook=True):
        super().__init__()
        rng = np.random.default_rng(3)
        self.in_proj_weight = Parameter(
            Tensor(rng.normal(0, 0.2, (3 * d, d)).astype(np.float32)), name="in_proj_weight"
        )
        self.in_proj_bias = Parameter(Tensor(rng.normal(0, 0.2, (3 * d,)).astype(np.float32)), name="in_proj_bias")
        self.out_proj = Linear(d, d)
        if hook:
            self.in_proj_lora = None

    def construct(self, x):
        qkv = ops.matmul(x, self.in_proj_weight.T) + self.in_proj_bias
        if self.in_proj_lora is not None:
            qkv = qkv + self.in_proj_lora(x)
        q, k, v = ops.chunk(qkv, 3, axis=-1)
        attn = ops.softmax(ops.bmm(q, k.transpose(0, 2, 1)), axis=-1)
        return self.out_proj(ops.bmm(attn, v))


class OpenClipBlock(nn.Cell):
    def __init__(self, d, hook=True):
        super().__init__()
        self.attn = OpenClipAttention(d, hook)

    def construct(self, x):
        return self.attn(x)


def _nest(path, leaf):
    """Plain containers ``a.b.c`` around ``leaf``, built inside-out so parameter names get the full path."""
    for name in reversed(path.split(".")):
        holder = nn.Cell()
        setattr(holder, name, leaf)
        leaf = holder
    return leaf


class TextEncoder(nn.Cell):
    """Residual attention layers at the SD1 (HF CLIP) or SD2 (OpenCLIP) paths under ``cond_stage_model``."""

    def __init__(self, family, d=8, hook=True):
        super().__init__()
        if family == "sd1":
            self.path = "transformer.text_model.encoder.layers"
            layers = nn.CellList([HFLayer(d), HFLayer(d)])
        else:
            self.path = "model.transformer.resblocks"
            layers = nn.CellList([OpenClipBlock(d, hook), OpenClipBlock(d, hook)])
        self.cond_stage_model = _nest(self.path, layers)

    def construct(self, x):  # PyNative only
        layers = self.cond_stage_model
        for name in self.path.split("."):
            layers = getattr(layers, name)
        for layer in layers:
            x = layer(x) + x
        return x


def _inputs(rng, b=2, n=5, dim=16, m=3, ctx=12):
    return (
        Tensor(rng.normal(size=(b, n, dim)).astype(np.float32)),
        Tensor(rng.normal(size=(b, m, ctx)).astype(np.float32)),
    )


def _randomise_up(net, rng, std=0.1):
    for _, layer in lora_layers(net):
        layer.lora_up.weight.set_data(Tensor(rng.normal(0, std, layer.lora_up.weight.shape).astype(np.float32)))


# ------------------------------------------------------------------------------------------------------ tests
def test_injection_keeps_output_names_and_freezes_base(rng):
    net = LatentDiffusion()
    x, ctx = _inputs(rng)
    before = net(x, ctx).asnumpy()
    base = {p.name: p for p in net.get_parameters()}
    names = inject_lora(net, rank=4)
    prefix = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0"
    assert names == [f"{prefix}.attn1.{t}" for t in UNET_ATTENTION_TARGETS] + [
        f"{prefix}.attn2.{t}" for t in UNET_ATTENTION_TARGETS
    ]
    np.testing.assert_array_equal(net(x, ctx).asnumpy(), before)  # lora_up = 0

    after = {p.name: p for p in net.get_parameters()}
    for name, param in base.items():  # the base keeps its Parameter objects and names (full ckpts still load)
        assert after[name] is param
    assert f"{prefix}.attn1.to_q.weight" in after
    assert f"{prefix}.attn1.to_out.0.bias" in after
    trainable = sorted(p.name for p in net.trainable_params())
    expected = sorted(f"{m}.lora_{k}.weight" for m in names for k in ("down", "up"))
    assert trainable == expected
    assert not any(p.requires_grad for p in base.values())
    assert {n for n, _ in net.parameters_and_names()} == set(after)  # names equal cell paths
    # rank * (in + out) per module: attn1 4 x 16x16, attn2 to_k/to_v 12->16
    assert count_lora_parameters(net) == 4 * (6 * 32 + 2 * 28)
    down = after[f"{prefix}.attn1.to_q.lora_down.weight"].asnumpy()
    assert down.shape == (4, 16) and 0.1 < down.std() < 0.5  # N(0, std=1/r)
    assert not after[f"{prefix}.attn1.to_q.lora_up.weight"].asnumpy().any()


def test_extended_targets_skip_sd1_conv_proj(rng, caplog):
    net = LatentDiffusion(conv=True)
    with caplog.at_level(logging.WARNING, logger="ldm.lora"):
        names = inject_lora(net, UNET_EXTENDED_TARGETS, rank=2)
    assert len(names) == 10  # 8 attention + ff.net.0.proj + ff.net.2; proj_in/out are convs
    assert "proj_in (Conv2d)" in caplog.text and "proj_out (Conv2d)" in caplog.text
    linear = LatentDiffusion(conv=False)
    assert len(inject_lora(linear, UNET_EXTENDED_TARGETS, rank=2)) == 12


def test_target_patterns_scope_and_errors():
    net = LatentDiffusion()
    names = inject_lora(net, ("attn1.to_q", "ff.net.0.proj"), rank=2, scope="model.diffusion_model.input_blocks.1")
    prefix = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0"
    assert names == [f"{prefix}.attn1.to_q", f"{prefix}.ff.net.0.proj"]
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        inject_lora(net, ("to_q",))
    with pytest.raises(ValueError, match="no Dense module matches"):
        inject_lora(LatentDiffusion(), ("to_nothing",))
    with pytest.raises(ValueError, match="under scope"):
        inject_lora(LatentDiffusion(), scope="cond_stage_model")
    with pytest.raises(ValueError, match="rank"):
        inject_lora(LatentDiffusion(), rank=17)


def test_state_dict_round_trip_and_strict_load(rng):
    src = LatentDiffusion()
    inject_lora(src, rank=4, alpha=8)
    _randomise_up(src, rng)
    sd = lora_state_dict(src)
    assert len(sd) == 16 and all(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in sd)
    assert all(v.dtype == np.float32 for v in sd.values())
    adapter = to_adapter(src, family="sd2")
    assert adapter.meta["family"] == "sd2" and adapter.meta["alpha"] == 8.0
    assert {m.alpha for m in modules(adapter).values()} == {8.0}

    dst = LatentDiffusion()
    inject_lora(dst, rank=4)  # alpha defaults to rank; the adapter restores 8
    load_adapter(dst, adapter)
    assert all(layer.scaling == 2.0 for _, layer in lora_layers(dst))
    for key, value in lora_state_dict(dst).items():
        np.testing.assert_array_equal(value, sd[key])

    bad = dict(sd)
    wrong = next(iter(bad))
    bad[wrong.replace("lora_down", "lora.down")] = bad.pop(wrong)
    with pytest.raises(KeyError) as err:
        load_lora_state_dict(dst, bad)
    assert wrong in str(err.value) and "lora.down" in str(err.value)
    short = {k: (v[:2] if k.endswith("lora_down.weight") else v) for k, v in sd.items()}
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(dst, short)


def test_text_encoder_targets(rng):
    sd1 = TextEncoder("sd1")
    names = inject_lora(sd1, TEXT_ENCODER_TARGETS, rank=2)
    assert names[0] == "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    assert len(names) == 8

    sd2 = TextEncoder("sd2")
    x = Tensor(rng.normal(size=(2, 4, 8)).astype(np.float32))
    y0 = sd2(x).asnumpy()
    names = inject_lora(sd2, TEXT_ENCODER_TARGETS, rank=2)
    assert names[:2] == [
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_lora",
        "cond_stage_model.model.transformer.resblocks.0.attn.out_proj",
    ]
    sd = lora_state_dict(sd2)
    assert sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_lora.lora_up.weight"].shape == (24, 2)
    np.testing.assert_array_equal(sd2(x).asnumpy(), y0)
    _randomise_up(sd2, rng, std=0.3)
    y1 = sd2(x).asnumpy()
    assert np.abs(y1 - y0).max() > 1e-3
    merge_all(sd2)  # fused delta folds into in_proj_weight
    np.testing.assert_allclose(sd2(x).asnumpy(), y1, rtol=1e-5, atol=1e-5)
    unmerge_all(sd2)
    np.testing.assert_allclose(sd2(x).asnumpy(), y1, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="in_proj_lora"):
        inject_lora(TextEncoder("sd2", hook=False), ("attn.in_proj",))


def test_graph_mode_scale_and_merge_without_recompile(rng, graph_mode):
    net = LatentDiffusion()
    x, ctx = _inputs(rng)
    base = net(x, ctx).asnumpy()
    inject_lora(net, rank=4, dropout=0.1)
    _randomise_up(net, rng, std=0.3)
    net.set_train(False)
    y = net(x, ctx).asnumpy()
    assert np.abs(y - base).max() > 1e-3
    set_lora_scale(net, 0.0)  # a Parameter, so the compiled graph sees it
    np.testing.assert_allclose(net(x, ctx).asnumpy(), base, rtol=1e-5, atol=1e-5)
    set_lora_scale(net, 1.0)
    # merged: the branch multiplier is 0 and W carries the delta. Outputs reach ~100 in this unnormalised toy net,
    # so float32 rounding of W (merge re-associates the sum) shows up as ~1e-4 relative.
    merge_all(net)
    np.testing.assert_allclose(net(x, ctx).asnumpy(), y, rtol=2e-4, atol=1e-3)
    unmerge_all(net)
    np.testing.assert_allclose(net(x, ctx).asnumpy(), y, rtol=2e-4, atol=1e-3)
    net.set_train(True)
    assert np.isfinite(net(x, ctx).asnumpy()).all()  # dropout active in training


@pytest.mark.parametrize("family, expected", [("sd2", 829_952), ("sd1", 797_184)])
def test_full_unet_rank4_attention_count(family, expected):
    """Rank-4 to_q/k/v/out LoRA on the real SD UNet: 128 modules, the published parameter counts.

    Built under ``no_init_parameters`` so no weight memory is allocated (shapes and names only)."""
    from mindspore.nn.utils import no_init_parameters

    from ldm.models.unet import SD1_UNET_CONFIG, SD2_UNET_CONFIG, UNetModel

    arch = SD2_UNET_CONFIG if family == "sd2" else SD1_UNET_CONFIG
    with no_init_parameters():
        net = DiffusionWrapper(UNetModel(**arch))
        names = inject_lora(net, rank=4)
    assert len(names) == 128 and names[0] == "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert count_lora_parameters(net) == expected
    assert sum(int(np.prod(p.shape)) for p in net.trainable_params()) == expected
