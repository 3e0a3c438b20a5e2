"""PEFT folders (``save_pretrained`` layout) against the installed peft, diffusers and transformers.

An adapter made and saved by peft itself (non-zero B, alpha != r, a rank_pattern and an alpha_pattern; rsLoRA for SD1)
imports with ``python -m ldm.lora import RUN_FOLDER`` and reproduces peft's UNet and text-encoder outputs; our
``export --format peft`` loads with ``PeftModel.from_pretrained`` (UNet) and transformers' ``load_adapter`` (text
encoder), exactly as a user calls them, and reproduces ours.

Tolerance 2e-5 relative (max|a-b| / max|b|): our side merges the adapter into the fp32 base weights, as generation
does, while peft adds the low-rank path unmerged, so the fp32 roundings differ; measured at most 2.5e-6 (UNet) and
4.6e-7 (text encoder) on these draws. A lost rsLoRA scale moved the UNet output by 0.43, and the adapter's own effect
is checked to exceed 1e-2.
"""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest

from ldm.io.diffusers_format import read_diffusers_folder
from ldm.io.model_io import load_pretrained
from ldm.lora.cli import main as lora_main
from ldm.lora.merge import apply_adapters
from ldm.models.diffusion import build_model_from_config

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("diffusers")
from tiny_diffusers import build_components, save_folder  # noqa: E402

CLI_LAYOUT = ["--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "2,1"]
TOLERANCE = 2e-5


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _peft_lora(module, targets, rank_pattern, alpha_pattern, use_rslora, seed):
    """peft's own LoRA on ``module`` (in place) with random non-zero factors."""
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6.0,
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=use_rslora,
    )
    wrapped = peft.get_peft_model(module, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return wrapped


def _torch_outputs(unet, text, ids, x, t, ctx):
    with torch.no_grad():
        text_out = text(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
        unet_out = unet(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64)), torch.from_numpy(ctx)).sample
    return text_out, unet_out.numpy()


@pytest.mark.parametrize("family,use_rslora", [("sd1", True), ("sd2", False)])
def test_peft_folders_both_ways(family, use_rslora, tmp_path):
    unet, _, text = save_folder(tmp_path / "base", family=family)
    _, config = read_diffusers_folder(tmp_path / "base")
    model = build_model_from_config(config)
    load_pretrained(model, tmp_path / "base")
    ids = model.tokenize(["a photo of a red fox", ""])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    base = _torch_outputs(unet, text, ids, x, t, ctx)

    run = tmp_path / "run" / "step100"  # a peft trainer's run folder: unet/ and text_encoder/
    attn = ["to_q", "to_k", "to_v", "to_out.0"]
    _peft_lora(
        unet,
        attn,
        {"attn2.to_k": 2},
        {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2.0},
        use_rslora,
        1,
    ).save_pretrained(run / "unet")
    qkvo = ["q_proj", "k_proj", "v_proj", "out_proj"]
    _peft_lora(text, qkvo, {"layers.1.self_attn.k_proj": 2}, {"v_proj": 3.0}, use_rslora, 2).save_pretrained(
        run / "text_encoder"
    )
    theirs = _torch_outputs(unet, text, ids, x, t, ctx)
    assert min(_rel(b, a) for a, b in zip(theirs, base)) > 1e-2  # the adapter really acts

    ours_file = tmp_path / "ours.safetensors"
    assert lora_main(["import", str(run), str(ours_file), "--family", family, *CLI_LAYOUT]) == 0
    apply_adapters(model, [(ours_file, 1.0)], log=lambda _: None)
    ours = (
        model.get_learned_conditioning(ms.Tensor(ids)).asnumpy(),
        model.apply_model(ms.Tensor(x), ms.Tensor(t), ms.Tensor(ctx)).asnumpy(),
    )
    for a, b in zip(ours, theirs):
        assert _rel(a, b) < TOLERANCE

    out = tmp_path / "exported"
    assert lora_main(["export", str(ours_file), str(out), "--format", "peft", *CLI_LAYOUT]) == 0
    fresh_unet, _, fresh_text = build_components(family)
    loaded_unet = peft.PeftModel.from_pretrained(fresh_unet, out / "unet")
    fresh_text.load_adapter(str(out / "text_encoder"))
    exported = _torch_outputs(loaded_unet, fresh_text, ids, x, t, ctx)
    for a, b in zip(exported, ours):
        assert _rel(a, b) < TOLERANCE


def _tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    )


@pytest.mark.parametrize("field", ["lora_bias"])
def test_unsupported_peft_feature_is_refused_by_name(field, tmp_path, capsys):
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], **{field: True})
    peft.get_peft_model(_tiny_text_encoder(), config).save_pretrained(tmp_path / "text_encoder")
    out = tmp_path / "ours.safetensors"
    assert lora_main(["import", str(tmp_path), str(out), "--family", "sd1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and repr(field) in err, err
    assert not out.exists()


def test_peft_folder_module_outside_targets_is_refused(tmp_path, capsys):
    """A folder whose weights name a module its target_modules does not select is not converted silently."""
    folder = tmp_path / "text_encoder"
    peft.get_peft_model(_tiny_text_encoder(), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["k_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert lora_main(["import", str(folder), str(tmp_path / "o.safetensors"), "--family", "sd1"]) == 2
    assert "outside target_modules" in capsys.readouterr().err
