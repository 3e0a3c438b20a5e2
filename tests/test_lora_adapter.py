"""ldm.lora.adapter: the adapter file (names, metadata, alpha defaults, read/write errors, legacy files)."""

import json

import numpy as np
import pytest

from ldm.io.checkpoint import CheckpointError, read_state_dict, write_state_dict
from ldm.lora.adapter import DOWN, META_KEY, UP, Adapter, module_scale, modules, read_adapter, write_adapter
from ldm.lora.merge import merge_into_base
from tests.lora_files import WIDTH, random_adapter, te_shapes, unet_shapes


def test_write_read_round_trip(tmp_path, rng):
    adapter = random_adapter("sd2", rng)
    write_adapter(tmp_path / "a.safetensors", adapter)
    back = read_adapter(tmp_path / "a.safetensors")
    assert back.meta == adapter.meta and back.meta["family"] == "sd2" and back.meta["rank"] == 4
    assert sorted(back.state) == sorted(adapter.state)
    for key, value in adapter.state.items():
        np.testing.assert_array_equal(back.state[key], value)
    mods = modules(back)
    down, up, alpha = mods["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_lora"]
    assert up.shape[0] == 3 * WIDTH and down.shape[1] == WIDTH


def test_alpha_defaults(rng):
    """No .alpha tensor: the metadata alpha, else the rank (scale 1)."""
    d, u = rng.normal(size=(4, 32)), rng.normal(size=(32, 4))
    state = {
        "model.diffusion_model.middle_block.1.proj_in" + DOWN: d,
        "model.diffusion_model.middle_block.1.proj_in" + UP: u,
    }
    (m,) = modules(Adapter(state, {"family": "sd1"})).values()
    assert m.alpha == 4.0
    (m,) = modules(Adapter(state, {"family": "sd1", "alpha": 1})).values()
    assert module_scale(m.down, m.alpha) == 0.25


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop(next(k for k in s if k.endswith(UP))), "has no matching"),
        (lambda s: s.update({next(k for k in s if k.endswith(UP)): np.zeros((32, 3), np.float32)}), "rank mismatch"),
        (lambda s: s.update({"model.diffusion_model.out.2.weight": np.zeros(1, np.float32)}), "not a LoRA key"),
    ],
)
def test_read_errors_name_file_and_key(tmp_path, rng, mutate, message):
    adapter = random_adapter("sd1", rng, shapes=unet_shapes(extended=False))
    mutate(adapter.state)
    path = tmp_path / "bad.safetensors"
    write_state_dict(path, adapter.state, {META_KEY: json.dumps(adapter.meta)})
    with pytest.raises(CheckpointError, match=message) as info:
        read_adapter(path)
    assert str(path) in str(info.value)


def test_read_errors_metadata(tmp_path, rng):
    adapter = random_adapter("sd1", rng, shapes=te_shapes("sd1"))
    path = tmp_path / "nometa.safetensors"
    write_state_dict(path, adapter.state)
    with pytest.raises(CheckpointError, match="family unknown"):
        read_adapter(path)
    write_state_dict(path, adapter.state, {META_KEY: json.dumps({"rank": 4})})
    with pytest.raises(CheckpointError, match="no 'family'"):
        read_adapter(path)
    write_state_dict(path, adapter.state, {META_KEY: json.dumps({"family": "sd2"})})  # SD1 names, sd2 claimed
    with pytest.raises(CheckpointError, match="not a sd2 text-encoder name"):
        read_adapter(path)


def test_reads_ldm_lora_py_metadata(tmp_path, rng):
    """Files written by the former network metadata (lora.* keys, per-module alpha, fused ``in_proj_lora``) read."""
    down, up = rng.normal(size=(2, 32)).astype(np.float32), rng.normal(size=(96, 2)).astype(np.float32)
    name = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_lora"
    metadata = {
        "lora.format": "ldm-lora/1",
        "lora.family": "sd2",
        "lora.targets": '["attn.in_proj"]',
        "lora.modules": json.dumps({name: {"rank": 2, "alpha": 8.0, "kind": "LoRAFusedInProj"}}),
    }
    write_state_dict(tmp_path / "t.safetensors", {name + DOWN: down, name + UP: up}, metadata)
    adapter = read_adapter(tmp_path / "t.safetensors")
    assert modules(adapter)[name].alpha == 8.0
    base = {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": np.zeros((96, 32), np.float32)}
    merged = merge_into_base(base, adapter)
    np.testing.assert_allclose(merged[next(iter(base))], 4.0 * up.astype(np.float64) @ down, rtol=1e-6)


def test_legacy_fused_name_reads_as_the_network_name(tmp_path, rng):
    """The former tools wrote the fused q/k/v module as ``attn.in_proj``; it reads as ``attn.in_proj_lora``, the
    name of the injected network's parameters, and is written back under that name."""
    down, up = rng.normal(size=(2, 32)).astype(np.float32), rng.normal(size=(96, 2)).astype(np.float32)
    old = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj"
    state = {old + DOWN: down, old + UP: up, old + ".alpha": np.float32(4.0)}
    write_state_dict(tmp_path / "old.safetensors", state, {META_KEY: json.dumps({"family": "sd2"})})
    adapter = read_adapter(tmp_path / "old.safetensors")
    assert set(modules(adapter)) == {old + "_lora"}
    write_adapter(tmp_path / "new.safetensors", adapter)
    assert set(read_state_dict(tmp_path / "new.safetensors")) == {old + "_lora" + k for k in (DOWN, UP, ".alpha")}
