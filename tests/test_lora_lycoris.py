"""LyCORIS files (kohya names): LoHa and LoKr conventions, round trips, combine's refusals and unsupported algorithms.

The formulas are written out here in NumPy from LyCORIS' definitions (``dW = alpha / r * (w1a @ w1b) * (w2a @ w2b)``;
``dW = scale * kron(w1, w2)`` with scale ``alpha / r`` and 1 when neither LoKr factor is decomposed, whatever alpha
the file stores), independently of ``ldm.lora.adapter``; peft parity is in ``test_lora_variants_peft.py``. Merged
weights are compared at 1e-6 relative (float64 arithmetic on both sides, one float32 rounding of the result).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from lora_files import LAYOUT

import ldm  # noqa: F401  (must precede mindspore)
from ldm.io.checkpoint import read_state_dict, write_state_dict
from ldm.lora.adapter import META_KEY, parse, read_adapter
from ldm.lora.cli import main
from ldm.lora.interop import from_kohya, to_kohya

CLI_LAYOUT = ["--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "2,1"]
CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"  # [32, 32, 3, 3]: model.diffusion_model.input_blocks.1.0.in_layers.2
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # [32, 32]
FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # [128, 32]
OURS = {
    CONV1: "model.diffusion_model.input_blocks.1.0.in_layers.2",
    TO_Q: "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    FC1: "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1",
}


def _f(rng, *shape):
    return rng.normal(0, 0.3, shape).astype(np.float32)


def _lycoris_file(rng):
    """A LyCORIS state dict: LoHa on a 3x3 conv, LoKr with both factors full (an alpha stored, scale 1) on a UNet
    Linear, LoKr with a decomposed w2 and no alpha on a text-encoder Linear; returns (state, expected float64 deltas
    in the base weights' shapes)."""
    state, expected = {}, {}
    w1a, w1b, w2a, w2b = _f(rng, 32, 2), _f(rng, 2, 32 * 9), _f(rng, 32, 2), _f(rng, 2, 32 * 9)
    state.update({f"{CONV1}.hada_w1_a": w1a, f"{CONV1}.hada_w1_b": w1b, f"{CONV1}.hada_w2_a": w2a})
    state.update({f"{CONV1}.hada_w2_b": w2b, f"{CONV1}.alpha": np.float32(1.0)})
    h = (w1a.astype(np.float64) @ w1b) * (w2a.astype(np.float64) @ w2b)
    expected[OURS[CONV1]] = (1.0 / 2 * h).reshape(32, 32, 3, 3)
    k1, k2 = _f(rng, 4, 4), _f(rng, 8, 8)
    state.update({f"{TO_Q}.lokr_w1": k1, f"{TO_Q}.lokr_w2": k2, f"{TO_Q}.alpha": np.float32(7.0)})
    expected[OURS[TO_Q]] = np.kron(k1.astype(np.float64), k2)  # both full: scale 1 whatever alpha says
    t1, t2a, t2b = _f(rng, 8, 4), _f(rng, 16, 3), _f(rng, 3, 8)
    state.update({f"{FC1}.lokr_w1": t1, f"{FC1}.lokr_w2_a": t2a, f"{FC1}.lokr_w2_b": t2b})
    expected[OURS[FC1]] = np.kron(t1.astype(np.float64), t2a.astype(np.float64) @ t2b)  # no alpha: alpha = r
    return state, expected


def test_lycoris_file_imports_merges_and_round_trips(tmp_path, rng):
    state, expected = _lycoris_file(rng)
    src = tmp_path / "lycoris.safetensors"
    write_state_dict(src, state, {"ss_network_module": "lycoris.kohya", "ss_v2": "False"})
    ours = tmp_path / "ours.safetensors"
    assert main(["import", str(src), str(ours), *CLI_LAYOUT]) == 0
    adapter = read_adapter(ours)
    assert adapter.meta["lora_type"] == "loha+lokr"

    base = {key + ".weight": _f(rng, *d.shape) for key, d in expected.items()}
    base["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = _f(rng, 32)
    base_file, merged_file = tmp_path / "base.safetensors", tmp_path / "merged.safetensors"
    write_state_dict(base_file, base)
    assert main(["merge", str(base_file), str(ours), str(merged_file), "--weight", "0.5"]) == 0
    merged = read_state_dict(merged_file)
    for key, delta in expected.items():
        want = base[key + ".weight"].astype(np.float64) + 0.5 * delta
        assert np.abs(merged[key + ".weight"] - want).max() <= 1e-6 * np.abs(want).max(), key

    back, _ = to_kohya(adapter, LAYOUT)  # LyCORIS names and shapes again, factors bit for bit
    assert sorted(back) == sorted([*state, f"{FC1}.alpha"])
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    again = parse(from_kohya(back, "sd1", LAYOUT))[2]
    assert {p: m[2] for p, m in again.items()} == {p: m[2] for p, m in parse(adapter)[2].items()}


def _one_line_error(capsys, argv, match, out):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and match in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "part,name",
    [
        ("a1.weight", "GLoRA"),
        ("on_input", "(IA)^3"),
        ("oft_blocks", "OFT/BOFT"),
        ("lora_mid.weight", "LoCon with Tucker decomposition (lora_mid)"),
        ("hada_t1", "LoHa with Tucker"),
        ("diff", "full"),
    ],
)
def test_unsupported_lycoris_algorithm_is_one_line(part, name, tmp_path, capsys):
    src = tmp_path / "lycoris.safetensors"
    write_state_dict(src, {f"{TO_Q}.{part}": np.zeros((4, 4), np.float32), f"{TO_Q}.alpha": np.float32(1)})
    out = tmp_path / "out.safetensors"
    _one_line_error(capsys, ["import", str(src), str(out), "--family", "sd1", *CLI_LAYOUT], f"algorithm {name}", out)


def test_combine_refuses_what_it_cannot_do_exactly(tmp_path, rng, capsys):
    """DoRA is not a delta (svd and lpl refuse it by name), lpl sums factors (refuses LoHa/LoKr), svd sums LoHa/LoKr
    deltas exactly at full rank."""
    state, expected = _lycoris_file(rng)
    products = tmp_path / "products.safetensors"
    write_state_dict(tmp_path / "lycoris.safetensors", state)
    assert main(["import", str(tmp_path / "lycoris.safetensors"), str(products), "--family", "sd1", *CLI_LAYOUT]) == 0
    path = OURS[TO_Q]
    dora = {f"{path}.lora_down.weight": _f(rng, 2, 32), f"{path}.lora_up.weight": _f(rng, 32, 2)}
    dora[f"{path}.dora_scale"] = np.abs(_f(rng, 32)) + 1
    dora_file = tmp_path / "dora.safetensors"
    write_state_dict(dora_file, dora, {META_KEY: json.dumps({"family": "sd1"})})
    out = tmp_path / "out.safetensors"
    for mode in ("svd", "lpl"):
        _one_line_error(capsys, ["combine", str(dora_file), str(products), str(out), "--mode", mode], "DoRA", out)
    _one_line_error(capsys, ["combine", str(products), str(products), str(out), "--mode", "lpl"], "lokr", out)
    assert main(["combine", str(products), str(products), str(out), "--w1", "0.25", "--w2", "0.5"]) == 0
    capsys.readouterr()
    loras, _, _ = parse(read_adapter(out))
    for key, delta in expected.items():
        down, up, alpha = loras[key]
        got = alpha / down.shape[0] * (up.astype(np.float64) @ down.reshape(down.shape[0], -1).astype(np.float64))
        assert np.abs(got.reshape(delta.shape) - 0.75 * delta).max() <= 1e-5 * np.abs(delta).max(), key
