"""LoRA layers and injection on small cell trees that carry the UNet / text-encoder names (ldm.lora)."""

import logging

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn, ops

import ldm  # noqa: F401  (must precede mindspore)
from ldm.lora.adapter import Adapter, modules
from ldm.lora.layers import LoRADense
from ldm.lora.network import (
    count_lora_parameters,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_all,
    set_lora_scale,
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


def _dense_params(in_f, out_f, rng):
    return rng.normal(0, 0.3, (out_f, in_f)).astype(np.float32), rng.normal(0, 0.3, (out_f,)).astype(np.float32)


def _make_dense(w, b):
    dense = nn.Dense(w.shape[1], w.shape[0], has_bias=b is not None)
    dense.weight.set_data(Tensor(w))
    if b is not None:
        dense.bias.set_data(Tensor(b))
    return dense


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


def test_parity_with_peft_linear(rng):
    """Forward and gradients w.r.t. A (lora_down) and B (lora_up) against PEFT's Linear; fp32 on both sides,
    agreement to 1e-5 relative (summation order differs)."""
    torch = pytest.importorskip("torch")
    peft_lora = pytest.importorskip("peft.tuners.lora")
    from peft import LoraConfig

    in_f, out_f, r, alpha = 10, 7, 4, 8.0
    w, b = _dense_params(in_f, out_f, rng)
    a_w = rng.normal(0, 0.3, (r, in_f)).astype(np.float32)
    b_w = rng.normal(0, 0.3, (out_f, r)).astype(np.float32)
    x = rng.normal(size=(3, 5, in_f)).astype(np.float32)
    g = rng.normal(size=(3, 5, out_f)).astype(np.float32)

    base = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(w))
        base.bias.copy_(torch.from_numpy(b))
    ref = peft_lora.Linear(base, "default", config=LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(torch.from_numpy(a_w))
        ref.lora_B["default"].weight.copy_(torch.from_numpy(b_w))
    y_ref = ref(torch.from_numpy(x))
    (y_ref * torch.from_numpy(g)).sum().backward()

    layer = LoRADense(_make_dense(w, b), rank=r, alpha=alpha)
    layer.lora_down.weight.set_data(Tensor(a_w))
    layer.lora_up.weight.set_data(Tensor(b_w))
    assert layer.scaling == ref.scaling["default"] == 2.0
    weights = [layer.lora_down.weight, layer.lora_up.weight]
    grad_fn = ms.value_and_grad(lambda xx, gg: (layer(xx) * gg).sum(), None, weights)
    _, (g_down, g_up) = grad_fn(Tensor(x), Tensor(g))

    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), y_ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_down.asnumpy(), ref.lora_A["default"].weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_up.asnumpy(), ref.lora_B["default"].weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    ref.merge()
    layer.merge()
    np.testing.assert_allclose(layer.weight.asnumpy(), ref.base_layer.weight.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_merge_unmerge_exact_and_guarded(rng, caplog):
    w, b = _dense_params(16, 12, rng)
    layer = LoRADense(_make_dense(w, b), rank=4, alpha=2.0)
    layer.lora_up.weight.set_data(Tensor(rng.normal(0, 0.5, (12, 4)).astype(np.float32)))
    x = Tensor(rng.normal(size=(6, 16)).astype(np.float32))
    y = layer(x).asnumpy()
    delta = 0.5 * layer.lora_up.weight.asnumpy() @ layer.lora_down.weight.asnumpy()

    layer.merge()
    assert layer.merged and float(layer.lora_mult.asnumpy()) == 0.0
    np.testing.assert_allclose(layer.weight.asnumpy(), w + delta, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer(x).asnumpy(), y, rtol=1e-5, atol=1e-5)
    with caplog.at_level(logging.WARNING, logger="ldm.lora"):
        layer.merge()  # guarded: a second merge must not add the delta twice
    assert "already merged" in caplog.text
    np.testing.assert_allclose(layer.weight.asnumpy(), w + delta, rtol=1e-6, atol=1e-6)

    layer.set_scale(0.25)  # re-merges with the new strength
    np.testing.assert_allclose(layer.weight.asnumpy(), w + 0.25 * delta, rtol=1e-6, atol=1e-6)
    layer.unmerge()
    assert not layer.merged and float(layer.lora_mult.asnumpy()) == 0.25 * 0.5
    np.testing.assert_allclose(layer.weight.asnumpy(), w, rtol=0, atol=2e-7)  # fp32 rounding of W + d - d
    layer.set_scale(1.0)
    np.testing.assert_allclose(layer(x).asnumpy(), y, rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip_and_strict_load(rng):
    src = LatentDiffusion()
    inject_lora(src, rank=4, alpha=8)
    _randomise_up(src, rng)
    sd = lora_state_dict(src)
    assert len(sd) == 16 and all(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in sd)
    assert all(v.dtype == np.float32 for v in sd.values())
    adapter = Adapter.from_network(src, family="sd2")
    assert adapter.meta["family"] == "sd2" and adapter.meta["alpha"] == 8.0
    assert {m[2] for m in modules(adapter).values()} == {8.0}

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


def test_fp16_branch_keeps_fp32_params(rng):
    w, b = _dense_params(16, 12, rng)
    x = Tensor(rng.normal(size=(2, 5, 16)).astype(np.float32))
    ref = LoRADense(_make_dense(w, b), rank=4)
    half = LoRADense(_make_dense(w, b), rank=4, lora_dtype=ms.float16)
    up = rng.normal(0, 0.3, (12, 4)).astype(np.float32)
    for layer in (ref, half):
        layer.lora_down.weight.set_data(ref.lora_down.weight.value())
        layer.lora_up.weight.set_data(Tensor(up))
    y = half(x)
    assert y.dtype == ms.float32
    np.testing.assert_allclose(y.asnumpy(), ref(x).asnumpy(), rtol=1e-2, atol=1e-2)  # fp16 branch rounding
    assert half.lora_down.weight.dtype == ms.float32 and half.lora_up.weight.dtype == ms.float32
    grads = ms.grad(lambda xx: half(xx).sum(), None, [half.lora_down.weight, half.lora_up.weight])(x)
    assert all(g.dtype == ms.float32 and np.isfinite(g.asnumpy()).all() for g in grads)

    base16 = _make_dense(w, b).to_float(ms.float16)  # a UNet built with dtype=float16
    out = LoRADense(base16, rank=4)(x)
    assert out.dtype == ms.float16


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
