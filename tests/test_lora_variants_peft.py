"""DoRA, LoHa and LoKr against peft's own implementations on identical weights (tiny UNet and text encoders).

- Layers: our DoRA Linear and Conv2d equal peft's ``use_dora`` layers in output, in the gradients of A, B and the
  magnitude (peft holds the norm constant in the backward pass; so do we), and in the merged weight.
- Networks: an adapter made and saved by peft (``save_pretrained``: DoRA on attention, SD1's 1x1 ``proj_in`` and a 3x3
  ResBlock conv, SD2's fused q/k/v; LoHa and LoKr on attention, convs and text-encoder Linears, one LoKr module with
  both factors full so peft's ``alpha / r`` is folded in) imports with ``python -m ldm.lora import`` and gives peft's
  UNet and text-encoder outputs merged, and peft's merged weights (``merge_and_unload``) key for key. DoRA also runs
  unmerged in our injected network, and our DoRA exports (PEFT folder, diffusers file) load in
  ``PeftModel.from_pretrained`` and diffusers' ``load_lora_weights`` as written. (transformers' ``load_adapter``
  drops the magnitudes of a DoRA folder, peft's own ``save_pretrained`` output included: measured 0.96 off.)

Tolerances: outputs 2e-5 relative (max|a-b| / max|b|; fp32 on both sides, merged here against unmerged there, so
the roundings differ; measured below 5e-6), weights 1e-6 relative (one float64 merge rounded to float32 against
peft's float32 merge). Each network case checks that the adapter moves the outputs by more than 1e-2.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

import ldm  # noqa: F401  (must precede mindspore)
from ldm.io import text_encoder_keys, unet_keys
from ldm.io.diffusers_format import read_diffusers_folder, write_diffusers_folder
from ldm.io.loading import cell_state_dict
from ldm.io.model_io import load_pretrained
from ldm.lora.adapter import read_adapter
from ldm.lora.cli import main as lora_main
from ldm.lora.layers import LoRAConv, LoRADense
from ldm.lora.merge import apply_adapters, merge_into_base
from ldm.lora.network import inject_lora, load_adapter
from ldm.lora.targets import TEXT_ENCODER_TARGETS
from ldm.models.diffusion import build_model_from_config
from ldm.models.layers import Conv2d, Linear
from ldm.names import TEXT_PREFIX, UNET_PREFIX

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from tiny_diffusers import build_components, save_folder  # noqa: E402

CLI_LAYOUT = ["--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "2,1"]
KEY_LAYOUT = {"num_res_blocks": 1, "channel_mult": (1, 2), "attention_resolutions": (2, 1)}
OUT_TOL, WEIGHT_TOL = 2e-5, 1e-6
UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _randomize(module, seed):
    """Random non-zero adapter weights; DoRA magnitudes perturbed around their initial norms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif any(s in name for s in ("lora_", "hada_", "lokr_")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


# ------------------------------------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("conv", [False, True])
def test_dora_layer_matches_peft(conv, rng):
    in_f, out_f, r, alpha = 6, 5, 3, 4.5
    shape = (out_f, in_f, 3, 3) if conv else (out_f, in_f)
    w = rng.normal(0, 0.3, shape).astype(np.float32)
    b = rng.normal(0, 0.3, (out_f,)).astype(np.float32)
    x = rng.normal(size=(2, in_f, 6, 6) if conv else (3, 4, in_f)).astype(np.float32)
    base = torch.nn.Conv2d(in_f, out_f, 3, padding=1) if conv else torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(w))
        base.bias.copy_(torch.from_numpy(b))
    config = peft.LoraConfig(r=r, lora_alpha=alpha, use_dora=True)
    kind = peft.tuners.lora.Conv2d if conv else peft.tuners.lora.Linear
    ref = kind(base, "default", config=config, r=r, lora_alpha=alpha, use_dora=True)
    _randomize(ref, 0)
    y_ref = ref(torch.from_numpy(x))
    g = rng.normal(size=tuple(y_ref.shape)).astype(np.float32)
    (y_ref * torch.from_numpy(g)).sum().backward()
    a_ref, b_ref = ref.lora_A["default"].weight, ref.lora_B["default"].weight
    m_ref = ref.lora_magnitude_vector["default"].weight

    cell = Conv2d(in_f, out_f, 3, padding=1) if conv else Linear(in_f, out_f)
    cell.weight.set_data(Tensor(w))
    cell.bias.set_data(Tensor(b))
    layer = (LoRAConv if conv else LoRADense)(cell, rank=r, alpha=alpha, use_dora=True)
    np.testing.assert_allclose(layer.dora_scale.asnumpy(), np.linalg.norm(w.reshape(out_f, -1), axis=1), rtol=1e-6)
    layer.lora_down.weight.set_data(Tensor(a_ref.detach().numpy()))
    layer.lora_up.weight.set_data(Tensor(b_ref.detach().numpy().reshape(out_f, r)))
    layer.dora_scale.set_data(Tensor(m_ref.detach().numpy().reshape(-1)))
    params = list(layer.lora_parameters())
    y, grads = ms.value_and_grad(lambda xx: (layer(xx) * Tensor(g)).sum(), None, params)(Tensor(x))
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), y_ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, (a_ref, b_ref, m_ref)):
        theirs = theirs.grad.numpy().reshape(ours.shape)
        assert _rel(ours.asnumpy(), theirs) < 1e-5

    layer.merge()
    ref.merge()
    assert _rel(layer.weight.asnumpy(), ref.base_layer.weight.detach().numpy()) < WEIGHT_TOL
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), y_ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.asnumpy(), w, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------- networks


def _configs(variant: str, family: str):
    """peft configs (UNet, text encoder) of one case."""
    unet_targets = [*UNET_ATTN, "conv1"] + (["proj_in"] if family == "sd1" else [])
    if variant == "dora":
        te_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
        return (
            peft.LoraConfig(r=4, lora_alpha=6.0, target_modules=unet_targets, use_dora=True),
            peft.LoraConfig(r=4, lora_alpha=3.0, target_modules=te_targets, use_dora=True),
        )
    if variant == "loha":
        te_targets = ["out_proj", "fc1"] + (["q_proj"] if family == "sd1" else [])
        return (
            peft.LoHaConfig(r=2, alpha=3.0, target_modules=unet_targets, rank_pattern={"to_k": 3}),
            peft.LoHaConfig(r=2, alpha=5.0, target_modules=te_targets),
        )
    return (
        peft.LoKrConfig(r=2, alpha=3.0, target_modules=unet_targets, rank_pattern={"to_v": 64}),  # to_v: both full
        peft.LoKrConfig(r=2, alpha=5.0, target_modules=["out_proj", "fc2"], decompose_both=True),
    )


def _torch_outputs(unet, text, ids, x, t, ctx):
    with torch.no_grad():
        text_out = text(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
        unet_out = unet(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64)), torch.from_numpy(ctx)).sample
    return text_out, unet_out.numpy()


def _our_outputs(model, ids, x, t, ctx):
    return (
        model.get_learned_conditioning(Tensor(ids)).asnumpy(),
        model.apply_model(Tensor(x), Tensor(t), Tensor(ctx)).asnumpy(),
    )


def _ldm_state(unet, text, family):
    """peft's (merged) weights under our names, for the UNet and the text encoder."""
    unet_state = unet_keys.diffusers_to_ldm({k: v.numpy() for k, v in unet.state_dict().items()}, **KEY_LAYOUT)
    text_state = text_encoder_keys.diffusers_to_ldm({k: v.numpy() for k, v in text.state_dict().items()}, family)
    return {
        **{UNET_PREFIX + k: v for k, v in unet_state.items()},
        **{TEXT_PREFIX + k: v for k, v in text_state.items()},
    }


@pytest.mark.parametrize("variant,family", [("dora", "sd1"), ("dora", "sd2"), ("loha", "sd1"), ("lokr", "sd2")])
def test_peft_variant_imports_and_matches(variant, family, tmp_path, rng):
    save_folder(tmp_path / "base", family=family)
    _, config = read_diffusers_folder(tmp_path / "base")
    unet, _, text = build_components(family)
    model = build_model_from_config(config)
    load_pretrained(model, tmp_path / "base")
    ids = model.tokenize(["a photo of a red fox", ""])
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    base = _torch_outputs(unet, text, ids, x, t, ctx)

    unet_config, text_config = _configs(variant, family)
    run = tmp_path / "run"
    peft_unet = peft.get_peft_model(unet, unet_config)
    _randomize(peft_unet, 1)
    peft_unet.save_pretrained(run / "unet")
    peft_text = peft.get_peft_model(text, text_config)
    _randomize(peft_text, 2)
    peft_text.save_pretrained(run / "text_encoder")
    theirs = _torch_outputs(unet, text, ids, x, t, ctx)
    assert min(_rel(a, b) for a, b in zip(theirs, base)) > 1e-2

    ours_file = tmp_path / "ours.safetensors"
    assert lora_main(["import", str(run), str(ours_file), "--family", family, *CLI_LAYOUT]) == 0
    adapter = read_adapter(ours_file)
    assert adapter.meta["lora_type"] == variant
    base_state = cell_state_dict(model)
    apply_adapters(model, [(ours_file, 1.0)], log=lambda _: None)
    for a, b in zip(_our_outputs(model, ids, x, t, ctx), theirs):
        assert _rel(a, b) < OUT_TOL

    if variant == "dora":
        _check_unmerged_and_exports(config, tmp_path, adapter, family, theirs, (ids, x, t, ctx))

    merged = merge_into_base(base_state, adapter)
    reference = _ldm_state(peft_unet.merge_and_unload(), peft_text.merge_and_unload(), family)
    changed = [k for k in reference if not np.array_equal(merged[k], base_state[k])]
    assert len(changed) >= 10
    for key, value in reference.items():
        assert _rel(merged[key], value) < WEIGHT_TOL, key


def _check_unmerged_and_exports(config, tmp_path, adapter, family, theirs, inputs):
    """DoRA unmerged in our injected network, and our exports in peft's and diffusers' loaders."""
    model = build_model_from_config(config)
    load_pretrained(model, tmp_path / "base")
    conv_targets = ("proj_in", "in_layers.2") if family == "sd1" else ("in_layers.2",)
    inject_lora(model.model, targets=(*UNET_ATTN, *conv_targets), rank=4, convolutions=True, use_dora=True)
    if family == "sd2":  # peft's separate q/k/v LoRAs join into one fused in_proj LoRA of rank 3 x 4
        inject_lora(model.cond_stage_model, targets=("attn.in_proj",), rank=12, use_dora=True)
        inject_lora(model.cond_stage_model, targets=("attn.out_proj",), rank=4, use_dora=True)
    else:
        inject_lora(model.cond_stage_model, targets=TEXT_ENCODER_TARGETS, rank=4, use_dora=True)
    load_adapter(model, adapter)
    ours = _our_outputs(model, *inputs)
    for a, b in zip(ours, theirs):
        assert _rel(a, b) < OUT_TOL

    ours_file = tmp_path / "ours.safetensors"
    folder = tmp_path / "exported"
    assert lora_main(["export", str(ours_file), str(folder), "--format", "peft", *CLI_LAYOUT]) == 0
    fresh_unet, _, fresh_text = build_components(family)
    loaded_unet = peft.PeftModel.from_pretrained(fresh_unet, folder / "unet")
    loaded_text = peft.PeftModel.from_pretrained(fresh_text, folder / "text_encoder")
    for a, b in zip(_torch_outputs(loaded_unet, loaded_text, *inputs), ours):
        assert _rel(a, b) < OUT_TOL

    state, pipe_config = read_diffusers_folder(tmp_path / "base")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        write_diffusers_folder(state, pipe_config, tmp_path / "pipe"),
        safety_checker=None,
        requires_safety_checker=False,
    )
    diff_file = tmp_path / "exported.safetensors"
    assert lora_main(["export", str(ours_file), str(diff_file), "--format", "diffusers", *CLI_LAYOUT]) == 0
    pipe.load_lora_weights(str(diff_file))
    for a, b in zip(_torch_outputs(pipe.unet, pipe.text_encoder, *inputs), ours):
        assert _rel(a, b) < OUT_TOL
