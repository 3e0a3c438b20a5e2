"""LoCon (LoRA on convolutions) against the PyTorch reference on identical weights.

- :class:`LoRAConv` equals peft's Conv2d LoRA (forward and the gradients of both factors) for a 3x3 and a 1x1 conv.
- Our LoCon adapter (SD1 1x1 ``proj_in``/``proj_out``, ResBlock 3x3 convs at another rank and alpha, time-embedding
  Linear and 1x1 shortcut, Downsample/Upsample convs), exported with ``python -m ldm.lora export``, loads in diffusers'
  ``load_lora_weights`` as written and gives our UNet output (kohya file for SD1, diffusers/PEFT file for SD2).
- A conv-target adapter saved by peft (``save_pretrained``) imports with ``python -m ldm.lora import`` and reproduces
  peft's output.

Tolerance 2e-5 relative (max|a-b| / max|b|): both sides compute in fp32, ours with the adapter merged or unmerged
against peft's unmerged branch, so roundings differ (measured below 3e-6). Each test checks that the adapter moves
the output by more than 1e-2, so a dropped or mis-scaled module would show.
"""

from __future__ import annotations

import logging

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

import ldm  # noqa: F401  (must precede mindspore)
from ldm.io.diffusers_format import read_diffusers_folder, write_diffusers_folder
from ldm.io.model_io import load_pretrained, model_family
from ldm.lora.adapter import read_adapter, write_adapter
from ldm.lora.cli import main as lora_main
from ldm.lora.layers import LoRAConv
from ldm.lora.merge import apply_adapters
from ldm.lora.network import inject_lora, lora_layers, to_adapter
from ldm.lora.targets import UNET_CONV3X3_TARGETS, UNET_EXTENDED_TARGETS, UNET_RESBLOCK_TARGETS
from ldm.models.diffusion import build_model_from_config
from ldm.models.layers import Conv2d

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from tiny_diffusers import build_components, save_folder  # noqa: E402

CLI_LAYOUT = ["--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "2,1"]
TOLERANCE = 2e-5


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (1, 1, 0)])
def test_conv_layer_matches_peft(kernel, stride, padding, rng):
    in_c, out_c, r, alpha = 6, 5, 3, 4.5
    w = rng.normal(0, 0.3, (out_c, in_c, kernel, kernel)).astype(np.float32)
    b = rng.normal(0, 0.3, (out_c,)).astype(np.float32)
    down = rng.normal(0, 0.3, (r, in_c, kernel, kernel)).astype(np.float32)
    up = rng.normal(0, 0.3, (out_c, r, 1, 1)).astype(np.float32)
    x = rng.normal(size=(2, in_c, 8, 8)).astype(np.float32)

    base = torch.nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(w))
        base.bias.copy_(torch.from_numpy(b))
    ref = peft.tuners.lora.Conv2d(base, "default", config=peft.LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(torch.from_numpy(down))
        ref.lora_B["default"].weight.copy_(torch.from_numpy(up))
    y_ref = ref(torch.from_numpy(x))
    g = rng.normal(size=tuple(y_ref.shape)).astype(np.float32)
    (y_ref * torch.from_numpy(g)).sum().backward()

    conv = Conv2d(in_c, out_c, kernel, stride=stride, padding=padding)
    conv.weight.set_data(Tensor(w))
    conv.bias.set_data(Tensor(b))
    layer = LoRAConv(conv, rank=r, alpha=alpha)
    squeeze = kernel == 1  # a 1x1 conv's factors are 2-D, as in the adapter file
    layer.lora_down.weight.set_data(Tensor(down[:, :, 0, 0] if squeeze else down))
    layer.lora_up.weight.set_data(Tensor(up[:, :, 0, 0]))
    params = [layer.lora_down.weight, layer.lora_up.weight]
    y, (g_down, g_up) = ms.value_and_grad(lambda xx: (layer(xx) * Tensor(g)).sum(), None, params)(Tensor(x))
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), y_ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    a_grad = ref.lora_A["default"].weight.grad.numpy()
    np.testing.assert_allclose(g_down.asnumpy(), a_grad[:, :, 0, 0] if squeeze else a_grad, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        g_up.asnumpy(), ref.lora_B["default"].weight.grad.numpy()[:, :, 0, 0], rtol=1e-4, atol=1e-5
    )

    before = layer(Tensor(x)).asnumpy()
    layer.merge()
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.asnumpy(), w, atol=1e-6)


def _inject_locon(model, rng):
    """The trainer's LoCon module set (lora_targets extended + conv_rank), random non-zero ups."""
    unet = model.model
    inject_lora(unet, targets=UNET_EXTENDED_TARGETS, rank=4, alpha=6.0, convolutions=True)
    inject_lora(unet, targets=UNET_RESBLOCK_TARGETS, rank=4, alpha=6.0, convolutions=True)
    inject_lora(unet, targets=UNET_CONV3X3_TARGETS, rank=2, alpha=3.0, convolutions=True)
    for p in model.get_parameters():
        if ".lora_up." in p.name:
            p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3))


def _unet_inputs(rng):
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    return x, t, ctx


def _torch_unet(unet, x, t, ctx):
    with torch.no_grad():
        return unet(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64)), torch.from_numpy(ctx)).sample.numpy()


@pytest.mark.parametrize("family,fmt", [("sd1", "kohya"), ("sd2", "diffusers")])
def test_exported_locon_matches_in_diffusers(family, fmt, tmp_path, rng, caplog):
    src = tmp_path / "src"
    save_folder(src, family=family)
    state, config = read_diffusers_folder(src)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        write_diffusers_folder(state, config, tmp_path / "pipe"), safety_checker=None, requires_safety_checker=False
    )
    model = build_model_from_config(config)
    load_pretrained(model, src)
    with caplog.at_level(logging.WARNING, logger="ldm.lora.network"):
        _inject_locon(model, rng)
    assert "skipped" not in caplog.text  # with conv on, SD1's 1x1 proj_in/proj_out are adapted, not skipped
    kernels = {layer.kernel for _, layer in lora_layers(model)}
    assert kernels == {(1, 1), (3, 3)}
    ours_file = tmp_path / "ours.safetensors"
    write_adapter(ours_file, to_adapter(model, family=model_family(model)))
    assert read_adapter(ours_file).meta["lora_type"] == "locon"
    out = tmp_path / f"exported_{fmt}.safetensors"
    assert lora_main(["export", str(ours_file), str(out), "--format", fmt, *CLI_LAYOUT]) == 0

    x, t, ctx = _unet_inputs(rng)
    ours = model.apply_model(Tensor(x), Tensor(t), Tensor(ctx)).asnumpy()
    base = _torch_unet(pipe.unet, x, t, ctx)
    pipe.load_lora_weights(str(out))  # exactly what a user does with the exported file
    theirs = _torch_unet(pipe.unet, x, t, ctx)
    assert _rel(base, theirs) > 1e-2
    assert _rel(ours, theirs) < TOLERANCE


def test_peft_conv_adapter_imports(tmp_path, rng):
    save_folder(tmp_path / "base", family="sd1")
    _, config = read_diffusers_folder(tmp_path / "base")
    unet, _, _ = build_components("sd1")
    x, t, ctx = _unet_inputs(rng)
    base = _torch_unet(unet, x, t, ctx)
    targets = ["proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"]
    wrapped = peft.get_peft_model(
        unet, peft.LoraConfig(r=4, lora_alpha=6.0, target_modules=targets, rank_pattern={"conv1": 2})
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    wrapped.save_pretrained(tmp_path / "run" / "unet")
    theirs = _torch_unet(unet, x, t, ctx)
    assert _rel(base, theirs) > 1e-2

    ours_file = tmp_path / "ours.safetensors"
    assert lora_main(["import", str(tmp_path / "run"), str(ours_file), "--family", "sd1", *CLI_LAYOUT]) == 0
    model = build_model_from_config(config)
    load_pretrained(model, tmp_path / "base")
    apply_adapters(model, [(ours_file, 1.0)], log=lambda _: None)
    ours = model.apply_model(Tensor(x), Tensor(t), Tensor(ctx)).asnumpy()
    assert _rel(ours, theirs) < TOLERANCE


def test_trainer_builds_locon_with_dora(tmp_path):
    """``conv_rank`` adds kohya's LoCon module set (3x3 convs at conv_rank/conv_alpha, SD1's 1x1 proj_in/out and the
    ResBlocks' time embedding and shortcut at lora_rank); ``use_dora`` makes every layer DoRA. The trainable
    parameters are exactly the adapters', and the saved file names the variant and holds every module."""
    from ldm.train.options import TrainOptions
    from ldm.train.trainer import build_trainable_model, save_weights
    from ldm.util import CONFIG_DIR, load_config

    opts = TrainOptions(lora_targets="extended", lora_rank=4, conv_rank=2, conv_alpha=1.0, use_dora=True)
    model, params = build_trainable_model(opts, load_config(CONFIG_DIR / "tiny/sd1-tiny.yaml"))
    layers = dict(lora_layers(model))
    prefix = "model.diffusion_model."
    conv3 = {n for n, layer in layers.items() if layer.kernel == (3, 3)}
    assert all(layers[n].rank == 2 and layers[n].alpha == 1.0 for n in conv3)
    assert prefix + "input_blocks.1.0.in_layers.2" in conv3 and prefix + "input_blocks.2.0.op" in conv3
    assert prefix + "output_blocks.1.2.conv" in conv3  # Upsample
    for name in ("input_blocks.1.1.proj_in", "input_blocks.3.0.skip_connection", "input_blocks.1.0.emb_layers.1"):
        assert layers[prefix + name].rank == 4 and layers[prefix + name].kernel == (1, 1)
    assert all(layer.use_dora for layer in layers.values())
    assert {id(p) for p in params} == {id(p) for p in model.trainable_params()}
    assert sum(".dora_scale" in p.name for p in params) == len(layers)
    path = tmp_path / "a.safetensors"
    save_weights(model, params, path, opts)
    adapter = read_adapter(path)
    assert adapter.meta["lora_type"] == "dora"
    assert sum(k.endswith(".dora_scale") for k in adapter.state) == len(layers)
