"""ldm.lora_tools: adapter IO, diffusers/kohya export-import, fused in_proj split/join, merges, CLI.

Round trips copy the factors bit for bit, so deltas are compared exactly where no arithmetic touches the factors and
to float32 rounding (rtol 1e-6) where a scale is folded into an up factor.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from ldm import lora_tools as lt
from ldm.io.checkpoint import CheckpointError, read_metadata, read_state_dict, write_state_dict

# configs/tiny/sd{1,2}-tiny.yaml: model_channels 32, channel_mult [1, 2], num_res_blocks 1, attention [2, 1],
# context_dim 32, text width 32 with 2 layers.
LAYOUT = lt.UNetLayout(num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(2, 1))
BLOCK_CHANNELS = {
    "input_blocks.1.1": 32,
    "input_blocks.3.1": 64,
    "middle_block.1": 64,
    "output_blocks.0.1": 64,
    "output_blocks.1.1": 64,
    "output_blocks.2.1": 32,
    "output_blocks.3.1": 32,
}
CTX, WIDTH = 32, 32


def unet_shapes(extended=True):
    """[out, in] of every LoRA-able Linear of the tiny UNet (proj_in/out included: 1x1 convs for SD1)."""
    shapes = {}
    for block, c in BLOCK_CHANNELS.items():
        p = f"model.diffusion_model.{block}."
        t = p + "transformer_blocks.0."
        for a in ("attn1", "attn2"):
            shapes[f"{t}{a}.to_q"] = (c, c)
            shapes[f"{t}{a}.to_k"] = (c, c if a == "attn1" else CTX)
            shapes[f"{t}{a}.to_v"] = (c, c if a == "attn1" else CTX)
            shapes[f"{t}{a}.to_out.0"] = (c, c)
        if extended:
            shapes[t + "ff.net.0.proj"] = (8 * c, c)
            shapes[t + "ff.net.2"] = (c, 4 * c)
            shapes[p + "proj_in"] = (c, c)
            shapes[p + "proj_out"] = (c, c)
    return shapes


def te_shapes(family):
    shapes = {}
    for i in range(2):
        if family == "sd1":
            p = f"cond_stage_model.transformer.text_model.encoder.layers.{i}."
            shapes.update({p + f"self_attn.{n}_proj": (WIDTH, WIDTH) for n in "qkvo"})
            shapes[p + "self_attn.out_proj"] = shapes.pop(p + "self_attn.o_proj")
            shapes[p + "mlp.fc1"], shapes[p + "mlp.fc2"] = (4 * WIDTH, WIDTH), (WIDTH, 4 * WIDTH)
        else:
            p = f"cond_stage_model.model.transformer.resblocks.{i}."
            shapes[p + "attn.in_proj"] = (3 * WIDTH, WIDTH)
            shapes[p + "attn.out_proj"] = (WIDTH, WIDTH)
            shapes[p + "mlp.c_fc"], shapes[p + "mlp.c_proj"] = (4 * WIDTH, WIDTH), (WIDTH, 4 * WIDTH)
    return shapes


def random_adapter(family, rng, rank=4, alpha=2.0, mixed=True, shapes=None):
    """Random factors; with ``mixed`` every third module gets another rank and alpha (kohya-style per module)."""
    shapes = shapes or {**unet_shapes(), **te_shapes(family)}
    mods = {}
    for i, (path, (out, inp)) in enumerate(sorted(shapes.items())):
        r, a = (rank + 2, 1.0) if mixed and i % 3 == 0 else (rank, alpha)
        mods[path] = (rng.normal(size=(r, inp)).astype(np.float32), rng.normal(size=(out, r)).astype(np.float32), a)
    return lt.make_adapter(mods, {"family": family, "context_dim": CTX, "parameterization": "eps"})


def deltas(adapter):
    return {p: lt.delta_weight(m) for p, m in lt.modules(adapter).items()}


def assert_same_deltas(a, b, rtol=0.0):
    da, db = deltas(a), deltas(b)
    assert sorted(da) == sorted(db)
    for path in da:
        np.testing.assert_allclose(db[path], da[path], rtol=rtol, atol=rtol * np.abs(da[path]).max(), err_msg=path)


# ------------------------------------------------------------------------------------------------------------- IO


def test_write_read_round_trip(tmp_path, rng):
    adapter = random_adapter("sd2", rng)
    lt.write_adapter(tmp_path / "a.safetensors", adapter)
    back = lt.read_adapter(tmp_path / "a.safetensors")
    assert back.meta == adapter.meta and back.meta["family"] == "sd2" and back.meta["rank"] == 4
    assert sorted(back.state) == sorted(adapter.state)
    for key, value in adapter.state.items():
        np.testing.assert_array_equal(back.state[key], value)
    mods = lt.modules(back)
    down, up, alpha = mods["cond_stage_model.model.transformer.resblocks.0.attn.in_proj"]
    assert up.shape[0] == 3 * WIDTH and down.shape[1] == WIDTH


def test_alpha_defaults(rng):
    """No .alpha tensor: the metadata alpha, else the rank (scale 1)."""
    d, u = rng.normal(size=(4, 32)), rng.normal(size=(32, 4))
    state = {
        "model.diffusion_model.middle_block.1.proj_in" + lt.DOWN: d,
        "model.diffusion_model.middle_block.1.proj_in" + lt.UP: u,
    }
    (m,) = lt.modules(lt.Adapter(state, {"family": "sd1"})).values()
    assert m[2] == 4.0
    (m,) = lt.modules(lt.Adapter(state, {"family": "sd1", "alpha": 1})).values()
    assert lt.module_scale(m[0], m[2]) == 0.25


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop(next(k for k in s if k.endswith(lt.UP))), "has no matching"),
        (lambda s: s.update({next(k for k in s if k.endswith(lt.UP)): np.zeros((32, 3), np.float32)}), "rank mismatch"),
        (lambda s: s.update({"model.diffusion_model.out.2.weight": np.zeros(1, np.float32)}), "not a LoRA key"),
    ],
)
def test_read_errors_name_file_and_key(tmp_path, rng, mutate, message):
    adapter = random_adapter("sd1", rng, shapes=unet_shapes(extended=False))
    mutate(adapter.state)
    path = tmp_path / "bad.safetensors"
    write_state_dict(path, adapter.state, {lt.META_KEY: json.dumps(adapter.meta)})
    with pytest.raises(CheckpointError, match=message) as info:
        lt.read_adapter(path)
    assert str(path) in str(info.value)


def test_read_errors_metadata(tmp_path, rng):
    adapter = random_adapter("sd1", rng, shapes=te_shapes("sd1"))
    path = tmp_path / "nometa.safetensors"
    write_state_dict(path, adapter.state)
    with pytest.raises(CheckpointError, match="family unknown"):
        lt.read_adapter(path)
    write_state_dict(path, adapter.state, {lt.META_KEY: json.dumps({"rank": 4})})
    with pytest.raises(CheckpointError, match="no 'family'"):
        lt.read_adapter(path)
    write_state_dict(path, adapter.state, {lt.META_KEY: json.dumps({"family": "sd2"})})  # SD1 names, sd2 claimed
    with pytest.raises(CheckpointError, match="not a sd2 text-encoder name"):
        lt.read_adapter(path)


def test_reads_ldm_lora_py_metadata(tmp_path, rng):
    """Files written with ldm.lora.lora_metadata (lora.* keys, per-module alpha, fused ``in_proj_lora``) read too."""
    down, up = rng.normal(size=(2, 32)).astype(np.float32), rng.normal(size=(96, 2)).astype(np.float32)
    name = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_lora"
    metadata = {
        "lora.format": "ldm-lora/1",
        "lora.family": "sd2",
        "lora.targets": '["attn.in_proj"]',
        "lora.modules": json.dumps({name: {"rank": 2, "alpha": 8.0, "kind": "LoRAFusedInProj"}}),
    }
    write_state_dict(tmp_path / "t.safetensors", {name + lt.DOWN: down, name + lt.UP: up}, metadata)
    adapter = lt.read_adapter(tmp_path / "t.safetensors")
    assert lt.modules(adapter)[name][2] == 8.0
    base = {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": np.zeros((96, 32), np.float32)}
    merged = lt.merge_into_base(base, adapter)
    np.testing.assert_allclose(merged[next(iter(base))], 4.0 * up.astype(np.float64) @ down, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ export / import


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("fold", [False, True])
def test_diffusers_round_trip(family, fold, rng):
    adapter = random_adapter(family, rng)
    state, metadata = lt.to_diffusers(adapter, LAYOUT, fold_scale=fold)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in state
    assert "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.lora_B.weight" in state
    assert "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_A.weight" in state
    assert not any(k.endswith("alpha") for k in state)
    assert (lt.PEFT_METADATA_KEY in metadata) != fold
    conv = state["unet.mid_block.attentions.0.proj_in.lora_A.weight"]
    assert conv.ndim == (4 if family == "sd1" else 2)
    back = lt.from_diffusers(state, family, LAYOUT, metadata)
    assert_same_deltas(adapter, back, rtol=1e-6 if fold else 0.0)
    if not fold:  # factors and alphas survive unchanged
        for path, (d, u, a) in lt.modules(adapter).items():
            d2, u2, a2 = lt.modules(back)[path]
            if "in_proj" not in path:
                np.testing.assert_array_equal(d2, d)
                np.testing.assert_array_equal(u2, u)
                assert a2 == a


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
    mods = lt.modules(lt.from_diffusers(state, "sd1", LAYOUT))
    assert mods["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"][2] == 4.0
    assert mods["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.out_proj"][2] == 2.0
    with pytest.raises(CheckpointError, match="not a diffusers/PEFT LoRA key"):
        lt.from_diffusers({"unet.conv_in.weight": d}, "sd1", LAYOUT)
    with pytest.raises(CheckpointError, match="has no up factor"):
        lt.from_diffusers({q + ".lora_A.weight": d}, "sd1", LAYOUT)
    with pytest.raises(CheckpointError, match="not in the UNet layout"):  # SD default layout has no such module here
        lt.from_diffusers(
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
    state, metadata = lt.to_kohya(adapter, LAYOUT)
    assert metadata["ss_v2"] == str(family == "sd2")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert state[name + ".lora_down.weight"].shape[1] == 32 and state[name + ".alpha"].shape == ()
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight" in state
    assert "lora_te_text_model_encoder_layers_1_self_attn_k_proj.alpha" in state
    back = lt.from_kohya(state, family, LAYOUT)
    assert_same_deltas(adapter, back)
    for path, module in lt.modules(adapter).items():  # per-module scale preserved
        if "in_proj" not in path:
            assert lt.module_scale(*lt.modules(back)[path][::2]) == lt.module_scale(module[0], module[2])


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
    mods = lt.modules(lt.from_kohya(state, "sd1", LAYOUT))
    ma = mods["model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_v"]
    np.testing.assert_allclose(lt.delta_weight(ma), 0.25 * u.astype(np.float64) @ d)
    assert mods["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2"][2] == 4.0
    out, _ = lt.to_kohya(lt.make_adapter(mods, {"family": "sd1"}), LAYOUT)
    assert out[a + ".alpha"] == 1.0 and out[b + ".alpha"] == 4.0
    with pytest.raises(CheckpointError, match="not a module"):
        lt.from_kohya({"lora_unet_down_blocks_9_attentions_0_proj_in.alpha": np.float32(1)}, "sd1", LAYOUT)
    conv = {
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": np.zeros((4, 32, 3, 3), np.float32),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": np.zeros((32, 4, 1, 1), np.float32),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": np.float32(1),
        **state,
    }
    with pytest.raises(CheckpointError, match="conv LoRA"):
        lt.from_kohya(conv, "sd1", LAYOUT)
    with pytest.warns(UserWarning, match="dropped 1 conv LoRA modules"):
        assert len(lt.modules(lt.from_kohya(conv, "sd1", LAYOUT, skip_conv=True))) == 2


# ------------------------------------------------------------------------------------------------ fused in_proj


def test_fused_split_is_exact(rng):
    adapter = random_adapter("sd2", rng, shapes=te_shapes("sd2"), mixed=False)
    fused = lt.modules(adapter)["cond_stage_model.model.transformer.resblocks.0.attn.in_proj"]
    state, _ = lt.to_diffusers(adapter, LAYOUT)
    parts = []
    for i, n in enumerate("qkv"):
        prefix = f"text_encoder.text_model.encoder.layers.0.self_attn.{n}_proj"
        down, up = state[prefix + ".lora_A.weight"], state[prefix + ".lora_B.weight"]
        np.testing.assert_array_equal(down, fused[0])  # the shared down
        np.testing.assert_array_equal(up, fused[1][i * WIDTH : (i + 1) * WIDTH])  # its third of up
        parts.append(up.astype(np.float64) @ down)
    np.testing.assert_allclose(0.5 * np.concatenate(parts), lt.delta_weight(fused), rtol=1e-12)


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
    meta = {lt.PEFT_METADATA_KEY: json.dumps({"text_encoder.lora_alpha": 2, "text_encoder.r": 2})}
    adapter = lt.from_diffusers(state, "sd2", LAYOUT, meta)  # q scale 1, k scale 2/3
    ((path, (down, up, alpha)),) = lt.modules(adapter).items()
    assert path == "cond_stage_model.model.transformer.resblocks.1.attn.in_proj"
    assert down.shape == (5, 32) and up.shape == (96, 5)
    expected = np.concatenate([uq.astype(np.float64) @ dq, 2 / 3 * (uk.astype(np.float64) @ dk), np.zeros((32, 32))])
    np.testing.assert_allclose(lt.delta_weight((down, up, alpha)), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(up[64:], 0)
    # split again: zero columns are dropped, ranks 2 and 3 come back; v is an all-zero rank-5 LoRA
    state2, meta2 = lt.to_diffusers(adapter, LAYOUT)
    assert state2[p + "q_proj.lora_A.weight"].shape == (2, 32) and state2[p + "k_proj.lora_A.weight"].shape == (3, 32)
    assert_same_deltas(adapter, lt.from_diffusers(state2, "sd2", LAYOUT, meta2), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------- merges


def test_merge_into_base(rng):
    adapter = random_adapter("sd2", rng)
    base = {}
    for path, (down, up, _) in lt.modules(adapter).items():
        key = path.replace("attn.in_proj", "attn.in_proj_weight") if path.endswith("in_proj") else path + ".weight"
        base[key] = rng.normal(size=(up.shape[0], down.shape[1])).astype(np.float32)
    base["model.diffusion_model.out.2.bias"] = np.ones(4, np.float32)
    merged = lt.merge_into_base(base, adapter, weight=0.7)
    assert merged["model.diffusion_model.out.2.bias"] is base["model.diffusion_model.out.2.bias"]
    for path, module in lt.modules(adapter).items():
        key = path.replace("attn.in_proj", "attn.in_proj_weight") if path.endswith("in_proj") else path + ".weight"
        np.testing.assert_allclose(merged[key], base[key] + 0.7 * lt.delta_weight(module), rtol=1e-6, atol=1e-5)
    base.pop("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
    with pytest.raises(CheckpointError, match="in_proj_weight"):
        lt.merge_into_base(base, adapter)


def test_merge_1x1_conv_base(rng):
    d, u = rng.normal(size=(2, 32)).astype(np.float32), rng.normal(size=(32, 2)).astype(np.float32)
    adapter = lt.make_adapter({"model.diffusion_model.middle_block.1.proj_in": (d, u, 2.0)}, {"family": "sd1"})
    base = {"model.diffusion_model.middle_block.1.proj_in.weight": np.zeros((32, 32, 1, 1), np.float32)}
    (w,) = lt.merge_into_base(base, adapter).values()
    np.testing.assert_allclose(w[:, :, 0, 0], u.astype(np.float64) @ d, rtol=1e-6)


def test_lpl_is_weighted_sum_of_factors(rng):
    a = random_adapter("sd1", rng, shapes=te_shapes("sd1"), mixed=False)
    b = random_adapter("sd1", rng, shapes=te_shapes("sd1"), mixed=False)
    c = lt.combine_lpl(a, b, 0.3, 0.6)
    ma, mb = lt.modules(a), lt.modules(b)
    for path, (down, up, alpha) in lt.modules(c).items():
        np.testing.assert_allclose(down, 0.3 * ma[path][0] + 0.6 * mb[path][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(up, 0.3 * ma[path][1] + 0.6 * mb[path][1], rtol=1e-6, atol=1e-6)
        assert alpha == ma[path][2]
    with pytest.raises(CheckpointError, match="same modules"):
        lt.combine_lpl(a, random_adapter("sd1", rng, shapes=unet_shapes(False)))


def test_svd_full_rank_is_exact(rng):
    a = random_adapter("sd2", rng, rank=3)
    b = random_adapter("sd2", rng, rank=2, alpha=8.0, shapes={**unet_shapes(False), **te_shapes("sd2")})
    combined, report = lt.combine_svd(a, b, 0.8, -1.5, rank=5 + 4)  # >= max rank_a + max rank_b
    da, db = deltas(a), deltas(b)
    for path, delta in deltas(combined).items():
        exact = 0.8 * da[path] + (-1.5 * db[path] if path in db else 0)
        scale = np.abs(exact).max()
        np.testing.assert_allclose(delta, exact, rtol=0, atol=1e-5 * scale, err_msg=path)
        assert report.per_module[path] < 1e-6
    assert report.overall < 1e-6 and lt.modules(combined)[path][2] == lt.modules(combined)[path][0].shape[0]


def test_svd_low_rank_error_is_discarded_energy(rng):
    a = random_adapter("sd1", rng, rank=4, shapes=te_shapes("sd1"), mixed=False)
    b = random_adapter("sd1", rng, rank=4, shapes=te_shapes("sd1"), mixed=False)
    combined, report = lt.combine_svd(a, b, 1.0, 0.5, rank=3)
    da, db = deltas(a), deltas(b)
    res, ref = 0.0, 0.0
    for path in da:
        s = np.linalg.svd(da[path] + 0.5 * db[path], compute_uv=False)
        expected = np.sqrt((s[3:] ** 2).sum() / (s**2).sum())
        assert report.per_module[path] == pytest.approx(expected, rel=1e-4)
        assert 0.05 < expected < 1
        res, ref = res + (s[3:] ** 2).sum(), ref + (s**2).sum()
        assert lt.modules(combined)[path][0].shape[0] == 3
    assert report.overall == pytest.approx(np.sqrt(res / ref), rel=1e-4)


# ----------------------------------------------------------------------------------------------- diffusers / PEFT


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
    base = {lt.UNET_PREFIX + k: v for k, v in unet_keys.diffusers_to_ldm(base_d, **LAYOUT.key_args()).items()}
    adapter = random_adapter(family, rng, shapes=unet_shapes())
    ours = lt.merge_into_base(base, adapter)
    state, metadata = lt.to_diffusers(adapter, LAYOUT)
    write_state_dict(tmp_path / "lora.safetensors", state, metadata)
    unet.load_lora_adapter(str(tmp_path), weight_name="lora.safetensors", prefix="unet", adapter_name="x")
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == len(lt.modules(adapter))
    with torch.no_grad():
        for name, layer in layers.items():
            effective = layer.get_base_layer().weight.double() + layer.get_delta_weight("x").double()
            ldm_key = lt.UNET_PREFIX + next(
                iter(unet_keys.diffusers_to_ldm({name + ".weight": 0}, **LAYOUT.key_args()))
            )
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


# --------------------------------------------------------------------------------------------------------------- CLI

CLI_LAYOUT = ["--num-res-blocks", "1", "--channel-mult", "1,2", "--attention-resolutions", "2,1"]


def test_cli_round_trips(tmp_path, rng, capsys):
    adapter = random_adapter("sd2", rng)
    lt.write_adapter(tmp_path / "a.safetensors", adapter)
    assert (
        lt.main(
            [
                "export",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "k.safetensors"),
                "--format",
                "kohya",
                "--config",
                "configs/tiny/sd2-tiny.yaml",
            ]
        )
        == 0
    )
    assert lt.main(["import", str(tmp_path / "k.safetensors"), str(tmp_path / "b.safetensors"), *CLI_LAYOUT]) == 0
    back = lt.read_adapter(tmp_path / "b.safetensors")  # family from kohya's ss_v2
    assert back.meta["family"] == "sd2"
    assert_same_deltas(adapter, back, rtol=1e-6)
    assert (
        lt.main(
            [
                "export",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "d.safetensors"),
                "--format",
                "diffusers",
                *CLI_LAYOUT,
            ]
        )
        == 0
    )
    assert lt.PEFT_METADATA_KEY in read_metadata(tmp_path / "d.safetensors")
    assert (
        lt.main(
            [
                "import",
                str(tmp_path / "d.safetensors"),
                str(tmp_path / "c.safetensors"),
                "--family",
                "sd2",
                "--parameterization",
                "v",
                *CLI_LAYOUT,
            ]
        )
        == 0
    )
    assert lt.read_adapter(tmp_path / "c.safetensors").meta["parameterization"] == "v"
    assert (
        lt.main(
            [
                "combine",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "c.safetensors"),
                str(tmp_path / "s.safetensors"),
                "--w2",
                "-1",
                "--rank",
                "2",
            ]
        )
        == 0
    )
    assert "relative Frobenius error" in capsys.readouterr().out
    base = {
        (p[: -len(".in_proj")] + ".in_proj_weight" if p.endswith("in_proj") else p + ".weight"): np.zeros(
            (m[1].shape[0], m[0].shape[1]), np.float32
        )
        for p, m in lt.modules(adapter).items()
    }
    write_state_dict(tmp_path / "base.safetensors", base, {"config": "x"})
    assert (
        lt.main(
            [
                "merge",
                str(tmp_path / "base.safetensors"),
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "m.safetensors"),
                "--weight",
                "2",
            ]
        )
        == 0
    )
    merged = read_state_dict(tmp_path / "m.safetensors")
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v"
    np.testing.assert_allclose(merged[key + ".weight"], 2 * lt.delta_weight(lt.modules(adapter)[key]), rtol=1e-5)
    assert read_metadata(tmp_path / "m.safetensors")["config"] == "x"


def _one_line_error(capsys, argv, match, out=None):
    assert lt.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and match in err, err
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_cli_bad_input(tmp_path, rng, capsys):
    out = tmp_path / "out.safetensors"
    _one_line_error(
        capsys,
        ["export", str(tmp_path / "missing.safetensors"), str(out), "--format", "kohya"],
        "no such checkpoint file",
        out,
    )
    adapter = random_adapter("sd1", rng, shapes=te_shapes("sd1"))
    write_state_dict(tmp_path / "wrong.safetensors", adapter.state, {lt.META_KEY: json.dumps({"family": "sd3"})})
    _one_line_error(
        capsys,
        ["export", str(tmp_path / "wrong.safetensors"), str(out), "--format", "kohya"],
        "family must be one of",
        out,
    )
    write_state_dict(tmp_path / "sd1.safetensors", adapter.state, {lt.META_KEY: json.dumps({"family": "sd1"})})
    _one_line_error(
        capsys,
        [
            "export",
            str(tmp_path / "sd1.safetensors"),
            str(out),
            "--format",
            "diffusers",
            "--config",
            "configs/tiny/sd2-tiny.yaml",
        ],
        "does not match",
        out,
    )
    write_state_dict(
        tmp_path / "sd2base.safetensors",
        {"cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight": np.zeros((32, 32))},
    )
    _one_line_error(
        capsys,
        ["merge", str(tmp_path / "sd2base.safetensors"), str(tmp_path / "sd1.safetensors"), str(out)],
        "wrong family",
        out,
    )
    write_state_dict(
        tmp_path / "full.safetensors",
        {"model.diffusion_model.out.2.weight": np.zeros((4, 4))},
        {lt.META_KEY: json.dumps({"family": "sd1"})},
    )
    _one_line_error(
        capsys,
        ["combine", str(tmp_path / "full.safetensors"), str(tmp_path / "sd1.safetensors"), str(out)],
        "is not a LoRA key",
        out,
    )
    write_state_dict(
        tmp_path / "k.safetensors",
        {
            "lora_unet_conv_in.lora_down.weight": np.zeros((4, 4)),
            "first_stage_model.encoder.conv_in.weight": np.zeros((4, 4)),
        },
    )
    _one_line_error(
        capsys,
        ["import", str(tmp_path / "k.safetensors"), str(out), "--family", "sd1"],
        "cannot tell the LoRA format",
        out,
    )
    _one_line_error(
        capsys,
        ["import", str(tmp_path / "k.safetensors"), str(out), "--format", "kohya", "--family", "sd1"],
        "is not a kohya LoRA key",
        out,
    )
    _one_line_error(
        capsys, ["import", str(tmp_path / "k.safetensors"), str(out), "--family", "sd3"], "invalid choice", out
    )
    out.write_bytes(b"keep")
    _one_line_error(
        capsys, ["export", str(tmp_path / "sd1.safetensors"), str(out), "--format", "kohya"], "already exists"
    )
    assert out.read_bytes() == b"keep"


def test_cli_entry_point_help_and_error(tmp_path):
    run = [sys.executable, "-m", "ldm.lora_tools"]
    for command in ("export", "import", "merge", "combine"):
        res = subprocess.run([*run, command, "-h"], capture_output=True, text=True, check=True)
        assert "--overwrite" in res.stdout
    res = subprocess.run(
        [*run, "merge", "nope.safetensors", "nope2.safetensors", str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
