"""LoRA layers (ldm.lora.layers): parity with peft's Linear, merge/unmerge on the layer, the fp16 branch."""

import logging

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import ldm  # noqa: F401  (must precede mindspore)
from ldm.lora.layers import LoRADense


def _dense_params(in_f, out_f, rng):
    return rng.normal(0, 0.3, (out_f, in_f)).astype(np.float32), rng.normal(0, 0.3, (out_f,)).astype(np.float32)


def _make_dense(w, b):
    dense = nn.Dense(w.shape[1], w.shape[0], has_bias=b is not None)
    dense.weight.set_data(Tensor(w))
    if b is not None:
        dense.bias.set_data(Tensor(b))
    return dense


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
