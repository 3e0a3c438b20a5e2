"""Fused attention projections (ldm.models.fused_linear): the same outputs, gradients and state dict as the
separate layers.

The tiny SD2 UNet (``ldm/configs/tiny/sd2-tiny.yaml``) with rank-4 LoRA on to_q/to_k/to_v/to_out.0 (random non-zero
``lora_up``, a different alpha on one to_k so the per-block multipliers differ) runs once with q/k/v and k/v fused
(``plan_attention_fusion``, opt-in) and once with ``plan_attention_fusion(unet, enable=False)`` (every projection
its own layer, the default), on the same weights and inputs; forward output and the gradients of every LoRA
parameter are compared (PyNative: the same kernels as graph mode, without its compile).
Tolerance: max|fused - separate| / max|separate| <= 1e-5 for the output and loss, 5e-5 per
gradient tensor: the same float32 products summed in another order (one GEMM over the concatenated weights, a
block-diagonal up matrix whose zero blocks add exact zeros), which backpropagation through the UNet accumulates
(measured: output 1.1e-6, gradients up to 9.4e-6). Leaving out the per-block multipliers moved the output by 0.37
relative (measured), so a wrong multiplier or block fails by orders of magnitude.
"""

import ldm  # noqa: F401, I001  (must precede mindspore)

import mindspore as ms
import numpy as np
from mindspore import nn

from ldm.lora import UNET_ATTENTION_TARGETS, inject_lora, lora_layers, merge_all, unmerge_all
from ldm.models.attention import CrossAttention, plan_attention_fusion
from ldm.models.layers import assign_array
from ldm.util import instantiate_from_config, load_config

RTOL = 1e-5
GRAD_RTOL = 5e-5
CONFIG = "ldm/configs/tiny/sd2-tiny.yaml"


def _unet(lora: bool):
    ms.set_seed(0)
    config = load_config(CONFIG)["model"]["params"]["unet_config"]
    unet = instantiate_from_config(config)
    if lora:
        inject_lora(unet, UNET_ATTENTION_TARGETS, rank=4)
        rng = np.random.default_rng(1)
        for name, layer in lora_layers(unet):
            assign_array(layer.lora_up.weight, rng.standard_normal(layer.lora_up.weight.shape) * 0.1)
            if name.endswith("attn1.to_k"):
                layer.set_alpha(8.0)
        plan_attention_fusion(unet)  # opt-in: not faster on the CPU (benchmarks/README.md)
    return unet


def _inputs():
    rng = np.random.default_rng(2)
    x = ms.Tensor(rng.standard_normal((2, 4, 8, 8)), ms.float32)
    t = ms.Tensor(np.array([10, 700], np.int32))
    context = ms.Tensor(rng.standard_normal((2, 5, 32)), ms.float32)
    return x, t, context


class _Loss(nn.Cell):
    def __init__(self, unet):
        super().__init__(auto_prefix=False)
        self.unet = unet

    def construct(self, x, t, context):
        return (self.unet(x, t, context) ** 2).mean()


def _attentions(unet):
    return [c for _, c in unet.cells_and_names() if isinstance(c, CrossAttention)]


def _output_and_grads(unet, fused: bool):
    groups = plan_attention_fusion(unet, enable=fused)
    assert groups >= (len(_attentions(unet)) if fused else 0) and (groups == 0) != fused
    params = [p for p in unet.trainable_params()]
    step = ms.value_and_grad(_Loss(unet), None, params)
    loss, grads = step(*_inputs())
    out = unet(*_inputs())
    return out.asnumpy(), float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads)}


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_lora_fused_equals_separate():
    unet = _unet(lora=True)
    out_f, loss_f, grads_f = _output_and_grads(unet, fused=True)
    out_s, loss_s, grads_s = _output_and_grads(unet, fused=False)
    assert _rel(out_f, out_s) <= RTOL
    assert abs(loss_f - loss_s) <= RTOL * abs(loss_s)
    assert grads_f.keys() == grads_s.keys() and len(grads_s) == 2 * 4 * len(_attentions(unet))
    for name in grads_s:
        assert np.abs(grads_s[name]).max() > 0, name
        assert _rel(grads_f[name], grads_s[name]) <= GRAD_RTOL, name


def test_plain_projections_stay_separate_and_merge_works():
    """Frozen projections without LoRA are not fused (slower for sampling, see fused_linear); after merging a LoRA
    the fused graph gives the merged output, and after unmerging the original one."""
    assert plan_attention_fusion(_unet(lora=False)) == 0
    lora = _unet(lora=True)
    before = lora(*_inputs()).asnumpy()
    merge_all(lora)  # lora_mult becomes 0 and the delta moves into the weights the fused MatMul reads
    assert _rel(lora(*_inputs()).asnumpy(), before) <= RTOL
    unmerge_all(lora)
    assert _rel(lora(*_inputs()).asnumpy(), before) <= RTOL


def test_state_dict_keys_unchanged():
    """Fusion adds no parameter and renames none: the keys are those of the unfused network."""
    fused, separate = _unet(lora=True), _unet(lora=True)
    plan_attention_fusion(separate, enable=False)
    keys = list(fused.parameters_dict())
    assert keys == list(separate.parameters_dict())
    assert any(k.endswith("attn1.to_q.weight") for k in keys)
    assert any(k.endswith("attn1.to_k.lora_down.weight") for k in keys)
    assert not any("fused" in k for k in keys)


def test_dora_and_dropout_are_not_fused():
    """Layers the fused graph cannot compute (DoRA, dropout) keep their own construct."""
    config = load_config(CONFIG)["model"]["params"]["unet_config"]
    for kwargs in ({"use_dora": True}, {"dropout": 0.1}):
        unet = instantiate_from_config(config)
        inject_lora(unet, UNET_ATTENTION_TARGETS, rank=4, **kwargs)
        assert plan_attention_fusion(unet) == 0
        attentions = _attentions(unet)
        assert attentions and all(c.fused_qkv is None and c.fused_kv is None for c in attentions)


def test_training_option_fuses_the_unet_lora_projections():
    """``fuse_lora_projections`` is how a run asks for the fusion: off by default, on it fuses every attention."""
    from ldm.train.options import TrainOptions
    from ldm.train.trainer import build_trainable_model

    def fused_attentions(**kwargs) -> list[bool]:
        model, _ = build_trainable_model(TrainOptions(lora_rank=2, **kwargs), load_config(CONFIG))
        cells = [c for _, c in model.model.cells_and_names() if isinstance(c, CrossAttention)]
        return [c.fused_qkv is not None or c.fused_kv is not None for c in cells]

    assert not any(fused_attentions())
    fused = fused_attentions(fuse_lora_projections=True)
    assert fused and all(fused)  # self-attention's q/k/v, cross-attention's k/v
