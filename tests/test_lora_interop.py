"""Our trained adapter, exported to the diffusers format, loads with diffusers' ``load_lora_weights`` and gives the
same UNet and text-encoder outputs as our LoRA-injected model (same base weights, tiny random pipeline).

Tolerance 1e-5 relative (max|a-b| / max|b|): both sides run the same fp32 math; the LoRA delta adds one rank-4
matmul per projection. alpha != rank is used so a lost scale (diffusers' implied alpha = r) would show.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from ldm.io.diffusers_format import read_diffusers_folder, write_diffusers_folder
from ldm.io.model_io import load_pretrained, model_family
from ldm.lora.adapter import read_adapter, write_adapter
from ldm.lora.cli import main as lora_main
from ldm.lora.network import inject_lora, to_adapter
from ldm.lora.targets import TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS
from ldm.models.diffusion import build_model_from_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tiny_diffusers import save_folder  # noqa: E402

CLI_LAYOUT = ["--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "2,1"]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_exported_adapter_matches_in_diffusers(family, tmp_path):
    src = tmp_path / "src"
    save_folder(src, family=family)
    state, config = read_diffusers_folder(src)
    export = write_diffusers_folder(state, config, tmp_path / "pipe")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(export, safety_checker=None, requires_safety_checker=False)

    model = build_model_from_config(config)
    load_pretrained(model, src)
    inject_lora(model.cond_stage_model, targets=TEXT_ENCODER_TARGETS, rank=4, alpha=6.0)
    inject_lora(model.model, targets=UNET_ATTENTION_TARGETS, rank=4, alpha=6.0)
    rng = np.random.default_rng(0)
    for p in model.get_parameters():
        if ".lora_up." in p.name:
            p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3))
    ours_file = tmp_path / "ours.safetensors"
    write_adapter(ours_file, to_adapter(model, family=model_family(model)))
    diff_file = tmp_path / "exported.safetensors"
    assert lora_main(["export", str(ours_file), str(diff_file), "--format", "diffusers", *CLI_LAYOUT]) == 0
    ref.load_lora_weights(str(diff_file))  # exactly what a user does with the exported file

    ids = model.tokenize(["a photo of a red fox", ""])
    ctx = model.get_learned_conditioning(ms.Tensor(ids)).asnumpy()
    with torch.no_grad():
        ref_ctx = ref.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
    assert np.abs(ctx - ref_ctx).max() / np.abs(ref_ctx).max() < 1e-5

    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    ours = model.apply_model(ms.Tensor(x), ms.Tensor(t), ms.Tensor(ctx)).asnumpy()
    with torch.no_grad():
        theirs = ref.unet(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64)), torch.from_numpy(ctx)).sample
    theirs = theirs.numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-5

    # the adapter really acts: without it the outputs differ clearly
    ref.unload_lora_weights()
    with torch.no_grad():
        base = ref.unet(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64)), torch.from_numpy(ctx)).sample
    assert np.abs(base.numpy() - theirs).max() / np.abs(theirs).max() > 1e-2


def test_upl_merge_output_equals_unmerged_adapter(tmp_path):
    """``merge`` (cloneofsimo upl) folded into a fresh base model gives the LoRA-injected model's outputs.

    Tolerance 5e-4 relative: the merged weight W + s*up@down is rounded to fp32 once per layer while the unmerged path
    computes W x + s*up(down(x)) in fp32; the two roundings differ and compound through the UNet's ~30 projections
    and its one-channel GroupNorm groups (measured 1.2e-5 with the norm spelled out as mean/square/rsqrt, 1.0e-4 with
    MindSpore's fused GroupNorm kernel, which is the closer of the two to a float64 norm: 1.3e-7 against 4e-7 per
    layer). The adapter itself moves the output by 0.96 relative (checked below to exceed 0.1), so a scale error of
    0.1% would already exceed the bound."""
    from ldm.io.loading import cell_state_dict, load_state_dict_into
    from ldm.lora.merge import merge_into_base
    from ldm.util import CONFIG_DIR, load_config

    ms.set_seed(0)
    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    base_model = build_model_from_config(config)
    base_state = cell_state_dict(base_model)
    lora_model = build_model_from_config(config)
    load_state_dict_into(lora_model, base_state)
    inject_lora(lora_model.cond_stage_model, targets=TEXT_ENCODER_TARGETS, rank=2, alpha=3.0)
    inject_lora(lora_model.model, targets=UNET_ATTENTION_TARGETS, rank=2, alpha=3.0)
    rng = np.random.default_rng(1)
    for p in lora_model.get_parameters():
        if ".lora_up." in p.name:
            p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3))
    path = tmp_path / "a.safetensors"
    write_adapter(path, to_adapter(lora_model, family="sd2"))
    merged = merge_into_base(base_state, read_adapter(path), weight=1.0)
    load_state_dict_into(base_model, merged)

    ids = ms.Tensor(base_model.tokenize(["a green triangle"]))
    x = ms.Tensor(rng.standard_normal((1, 4, 16, 16)).astype(np.float32))
    t = ms.Tensor(np.array([500], np.int32))
    outs = []
    for m in (lora_model, base_model):
        ctx = m.get_learned_conditioning(ids)
        outs.append((ctx.asnumpy(), m.apply_model(x, t, ctx).asnumpy()))
    for a, b in zip(*outs):
        assert np.abs(a - b).max() / np.abs(b).max() < 5e-4
    unmerged = build_model_from_config(config)
    load_state_dict_into(unmerged, base_state)
    plain = unmerged.apply_model(x, t, unmerged.get_learned_conditioning(ids)).asnumpy()
    assert np.abs(plain - outs[1][1]).max() / np.abs(outs[1][1]).max() > 0.1  # the adapter changes the output
