"""ldm.lora.interop: diffusers/PEFT and kohya export/import, fused in_proj split/join.

Round trips copy the factors bit for bit, so deltas are compared exactly where no arithmetic touches the factors and
to float32 rounding (rtol 1e-6) where a scale is folded into an up factor."""

import json

import numpy as np
import pytest

from ldm.io.checkpoint import CheckpointError, read_state_dict, write_state_dict
from ldm.lora.adapter import delta_weight, make_adapter, modules
from ldm.lora.interop import PEFT_METADATA_KEY, from_diffusers, from_kohya, to_diffusers, to_kohya
from ldm.lora.merge import merge_into_base
from ldm.lora.peft_folder import read_peft_folder, write_peft_folder
from ldm.names import UNET_PREFIX
from tests.lora_files import (
    LAYOUT,
    WIDTH,
    assert_same_deltas,
    assert_same_factors,
    random_adapter,
    te_shapes,
    unet_shapes,
)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("fold", [False, True])
def test_diffusers_round_trip(family, fold, rng):
    adapter = random_adapter(family, rng)
    state, metadata = to_diffusers(adapter, LAYOUT, fold_scale=fold)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in state
    assert "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.lora_B.weight" in state
    # the names the installed transformers (>= 5) gives CLIP modules: no text_model. level
    assert "text_encoder.encoder.layers.1.self_attn.v_proj.lora_A.weight" in state
    assert not any(".text_model." in k for k in state) and "text_model." not in metadata.get(PEFT_METADATA_KEY, "")
    assert not any(k.endswith("alpha") for k in state)
    assert (PEFT_METADATA_KEY in metadata) != fold
    conv = state["unet.mid_block.attentions.0.proj_in.lora_A.weight"]
    assert conv.ndim == (4 if family == "sd1" else 2)
    back = from_diffusers(state, family, LAYOUT, metadata)
    assert_same_deltas(adapter, back, rtol=1e-6 if fold else 0.0)
    if not fold:  # factors and alphas survive unchanged (fused in_proj included: split and joined at rank r)
        assert_same_factors(adapter, back)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_text_encoder_names_with_and_without_text_model(family, rng):
    """diffusers with transformers >= 5 writes ``text_encoder.encoder.layers.N...``; older transformers and
    kohya-converted files write ``text_encoder.text_model.encoder.layers.N...``: both import to the same adapter."""
    adapter = random_adapter(family, rng, mixed=False)
    state, metadata = to_diffusers(adapter, LAYOUT)
    new = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in state.items()}
    old = {k.replace("text_encoder.encoder.", "text_encoder.text_model.encoder."): v for k, v in new.items()}
    assert any(k.startswith("text_encoder.encoder.") for k in new)
    assert any(k.startswith("text_encoder.text_model.encoder.") for k in old)
    for spelling in (new, old):
        assert_same_factors(adapter, from_diffusers(spelling, family, LAYOUT, metadata))


def test_diffusers_import_variants(rng):
    """lora.down/lora.up and lora_linear_layer names; legacy .alpha keys; no alpha at all means alpha = r."""
    d, u = rng.normal(size=(4, 32)).astype(np.float32), rng.normal(size=(32, 4)).astype(np.float32)
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    te = "text_encoder.text_model.encoder.layers.0.self_attn.out_proj"
    state = {
        q + ".lora.down.weight": d,
        q + ".lora.up.weight": u,
        te + ".lora_linear_layer.down.weight": d,
        te + ".lora_linear_layer.up.weight": u,
        te + ".alpha": 2.0,
    }
    mods = modules(from_diffusers(state, "sd1", LAYOUT))
    assert mods["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"].alpha == 4.0
    assert mods["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.out_proj"].alpha == 2.0
    with pytest.raises(CheckpointError, match="not a diffusers/PEFT LoRA key"):
        from_diffusers({"unet.conv_in.weight": d}, "sd1", LAYOUT)
    with pytest.raises(CheckpointError, match="has no up factor"):
        from_diffusers({q + ".lora_A.weight": d}, "sd1", LAYOUT)
    with pytest.raises(CheckpointError, match="not in the UNet layout"):  # SD default layout has no such module here
        from_diffusers(
            {
                q.replace("down_blocks.0", "down_blocks.3") + ".lora_A.weight": d,
                q.replace("down_blocks.0", "down_blocks.3") + ".lora_B.weight": u,
            },
            "sd1",
            LAYOUT,
        )


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_kohya_round_trip(family, rng):
    adapter = random_adapter(family, rng)
    state, metadata = to_kohya(adapter, LAYOUT)
    assert metadata["ss_v2"] == str(family == "sd2")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert state[name + ".lora_down.weight"].shape[1] == 32 and state[name + ".alpha"].shape == ()
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight" in state
    assert "lora_te_text_model_encoder_layers_1_self_attn_k_proj.alpha" in state
    back = from_kohya(state, family, LAYOUT)
    assert_same_deltas(adapter, back)
    assert_same_factors(adapter, back)  # per-module rank, alpha and factors preserved


def test_kohya_alpha_conventions(rng):
    """kohya trains with alpha 1 (stored): scale 1/r. A module without .alpha gets alpha = r (kohya's loader)."""
    d, u = rng.normal(size=(4, 32)).astype(np.float32), rng.normal(size=(32, 4)).astype(np.float32)
    a = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v"
    b = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    state = {
        a + ".lora_down.weight": d,
        a + ".lora_up.weight": u,
        a + ".alpha": np.float32(1.0),
        b + ".lora_down.weight": rng.normal(size=(4, 128)).astype(np.float32),
        b + ".lora_up.weight": u,
    }
    mods = modules(from_kohya(state, "sd1", LAYOUT))
    ma = mods["model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_v"]
    np.testing.assert_allclose(delta_weight(*ma), 0.25 * u.astype(np.float64) @ d)
    assert mods["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2"].alpha == 4.0
    out, _ = to_kohya(make_adapter(mods, {"family": "sd1"}), LAYOUT)
    assert out[a + ".alpha"] == 1.0 and out[b + ".alpha"] == 4.0
    with pytest.raises(CheckpointError, match="not a module"):
        from_kohya({"lora_unet_down_blocks_9_attentions_0_proj_in.alpha": np.float32(1)}, "sd1", LAYOUT)
    conv = {
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": np.zeros((4, 32, 3, 3), np.float32),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": np.zeros((32, 4, 1, 1), np.float32),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": np.float32(1),
        **state,
    }
    locon = modules(from_kohya(conv, "sd1", LAYOUT))  # LoCon: the 3x3 down stays 4-D, the 1x1 up is stored 2-D
    down, up, alpha = locon["model.diffusion_model.input_blocks.1.0.in_layers.2"]
    assert down.shape == (4, 32, 3, 3) and up.shape == (32, 4) and alpha == 1.0
    with pytest.warns(UserWarning, match="dropped 1 conv LoRA modules"):
        assert len(modules(from_kohya(conv, "sd1", LAYOUT, skip_conv=True))) == 2


# ------------------------------------------------------------------------------------------------ fused in_proj


def test_fused_split_is_exact(rng):
    adapter = random_adapter("sd2", rng, shapes=te_shapes("sd2"), mixed=False)
    fused = modules(adapter)["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_lora"]
    state, _ = to_diffusers(adapter, LAYOUT)
    parts = []
    for i, n in enumerate("qkv"):
        prefix = f"text_encoder.encoder.layers.0.self_attn.{n}_proj"
        down, up = state[prefix + ".lora_A.weight"], state[prefix + ".lora_B.weight"]
        np.testing.assert_array_equal(down, fused.down)  # the shared down
        np.testing.assert_array_equal(up, fused.up[i * WIDTH : (i + 1) * WIDTH])  # its third of up
        parts.append(up.astype(np.float64) @ down)
    np.testing.assert_allclose(0.5 * np.concatenate(parts), delta_weight(*fused), rtol=1e-12)


def test_join_separate_qkv_is_exact(rng):
    """Separate q/k/v (different ranks and scales; v missing) -> one fused LoRA of rank r_q + r_k, block-diagonal."""
    p = "text_encoder.text_model.encoder.layers.1.self_attn."
    dq, uq = rng.normal(size=(2, 32)).astype(np.float32), rng.normal(size=(32, 2)).astype(np.float32)
    dk, uk = rng.normal(size=(3, 32)).astype(np.float32), rng.normal(size=(32, 3)).astype(np.float32)
    state = {
        p + "q_proj.lora_A.weight": dq,
        p + "q_proj.lora_B.weight": uq,
        p + "k_proj.lora_A.weight": dk,
        p + "k_proj.lora_B.weight": uk,
    }
    meta = {PEFT_METADATA_KEY: json.dumps({"text_encoder.lora_alpha": 2, "text_encoder.r": 2})}
    adapter = from_diffusers(state, "sd2", LAYOUT, meta)  # q scale 1, k scale 2/3
    ((path, (down, up, alpha)),) = modules(adapter).items()
    assert path == "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_lora"
    assert down.shape == (5, 32) and up.shape == (96, 5)
    expected = np.concatenate([uq.astype(np.float64) @ dq, 2 / 3 * (uk.astype(np.float64) @ dk), np.zeros((32, 32))])
    np.testing.assert_allclose(delta_weight(down, up, alpha), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(up[64:], 0)
    # split again: zero columns are dropped, ranks 2 and 3 come back; v is an all-zero rank-5 LoRA
    state2, meta2 = to_diffusers(adapter, LAYOUT)
    q = "text_encoder.encoder.layers.1.self_attn."  # exported in the installed transformers' spelling
    assert state2[q + "q_proj.lora_A.weight"].shape == (2, 32) and state2[q + "k_proj.lora_A.weight"].shape == (3, 32)
    assert_same_deltas(adapter, from_diffusers(state2, "sd2", LAYOUT, meta2), rtol=1e-6)


@pytest.mark.parametrize("family", ["sd2", "sd1"])
def test_peft_loads_exported_unet_lora(family, tmp_path, rng):
    """diffusers 0.42 ``load_lora_adapter`` on our export (alpha via lora_adapter_metadata, mixed ranks/alphas)
    gives base + scale * B @ A equal to our merge_into_base."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    from ldm.io import unet_keys
    from tests.tiny_diffusers import build_components

    unet = build_components(family)[0]
    base_d = {k: v.numpy().copy() for k, v in unet.state_dict().items()}
    base = {UNET_PREFIX + k: v for k, v in unet_keys.diffusers_to_ldm(base_d, **LAYOUT.key_args()).items()}
    adapter = random_adapter(family, rng, shapes=unet_shapes())
    ours = merge_into_base(base, adapter)
    state, metadata = to_diffusers(adapter, LAYOUT)
    write_state_dict(tmp_path / "lora.safetensors", state, metadata)
    unet.load_lora_adapter(str(tmp_path), weight_name="lora.safetensors", prefix="unet", adapter_name="x")
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == len(modules(adapter))
    with torch.no_grad():
        for name, layer in layers.items():
            effective = layer.get_base_layer().weight.double() + layer.get_delta_weight("x").double()
            ldm_key = UNET_PREFIX + next(iter(unet_keys.diffusers_to_ldm({name + ".weight": 0}, **LAYOUT.key_args())))
            np.testing.assert_allclose(effective.numpy(), ours[ldm_key], rtol=1e-5, atol=1e-5, err_msg=name)
        unet.fuse_lora(adapter_names=["x"])
    fused = unet.state_dict()
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    fused_key = next(k for k in fused if k.startswith(key) and k.endswith("weight") and "lora" not in k)
    np.testing.assert_allclose(
        fused[fused_key].numpy(),
        ours["model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"],
        rtol=1e-5,
        atol=1e-5,
    )


def test_fused_round_trip_keeps_rank_and_factors(rng):
    """Export splits a fused rank-r in_proj LoRA into q/k/v sharing one down; import joins them back at rank r with
    the same factors bit for bit, so the result has the trainer's parameter names and shapes."""
    name = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_lora"
    down, up = rng.normal(size=(4, 32)).astype(np.float32), rng.normal(size=(96, 4)).astype(np.float32)
    adapter = make_adapter({name: (down, up, 2.0)}, {"family": "sd2"})
    state, meta = to_diffusers(adapter, LAYOUT)
    back = modules(from_diffusers(state, "sd2", LAYOUT, meta))
    assert list(back) == [name]
    np.testing.assert_array_equal(back[name].down, down)
    np.testing.assert_array_equal(back[name].up, up)
    assert back[name].alpha == 2.0


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_peft_folder_round_trip(family, rng, tmp_path):
    """``save_pretrained`` layout: per-network folders, PEFT keys and config; factors and alphas come back."""
    adapter = random_adapter(family, rng)
    assert write_peft_folder(tmp_path / "run", adapter, LAYOUT) == ["text_encoder", "unet"]
    state = read_state_dict(tmp_path / "run" / "text_encoder" / "adapter_model.safetensors")
    assert "base_model.model.encoder.layers.1.self_attn.v_proj.lora_A.weight" in state
    config = json.loads((tmp_path / "run" / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] and config["alpha_pattern"]
    assert_same_factors(adapter, read_peft_folder(tmp_path / "run", family, LAYOUT))
    unet_only = read_peft_folder(tmp_path / "run" / "unet", family, LAYOUT)
    assert all(k.startswith(UNET_PREFIX) for k in unet_only.state)
    with pytest.raises(CheckpointError, match="already exists"):
        write_peft_folder(tmp_path / "run", adapter, LAYOUT)
    write_peft_folder(tmp_path / "run", unet_only, LAYOUT, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["unet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no build or old folder left behind
