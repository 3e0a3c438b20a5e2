"""mindone MindSpore checkpoints -> our names, checked against the complete SD 1.x / 2.x name lists shipped with
mindone (tests/data/README.md): every mindone name maps to exactly one Stability name and together they cover them
all; the SD2 lists are line-aligned, so each pair is checked one to one."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from ldm.io.mindone_keys import is_mindone_state_dict, mindone_to_ldm

DATA = Path(__file__).parent / "data"


def _names(name: str) -> list[str]:
    with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line]


@pytest.mark.parametrize("version, family", [("v1", "sd1"), ("v2", "sd2")])
def test_full_name_lists_convert(version, family):
    mindone = _names(f"mindone_sd_{version}_names.txt.gz")
    ldm = _names(f"ldm_sd_{version}_names.txt.gz")
    state = {n: np.zeros((3, 2), np.float32) for n in mindone}
    assert is_mindone_state_dict(state) and not is_mindone_state_dict({n: None for n in ldm})
    converted = mindone_to_ldm(state, family)
    assert sorted(converted) == sorted(ldm)
    if version == "v2":
        for m, l in zip(mindone, ldm):
            assert list(mindone_to_ldm({m: state[m]}, family)) == [l], m


def test_sd1_fused_in_proj_splits_into_q_k_v():
    w = np.arange(12, dtype=np.float32).reshape(6, 2)
    key = "cond_stage_model.transformer.transformer_layer.resblocks.0.attn.attn.in_proj.weight"
    out = mindone_to_ldm({key: w}, "sd1")
    base = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn."
    np.testing.assert_array_equal(out[base + "q_proj.weight"], w[:2])
    np.testing.assert_array_equal(out[base + "k_proj.weight"], w[2:4])
    np.testing.assert_array_equal(out[base + "v_proj.weight"], w[4:])


def test_unknown_keys_are_named():
    with pytest.raises(KeyError, match="model.diffusion_model.foo.moving_mean"):
        mindone_to_ldm({"model.diffusion_model.foo.moving_mean": np.zeros(1)}, "sd2")
    with pytest.raises(KeyError, match="transformer_layer.resblocks.0.attn.bogus.weight"):
        mindone_to_ldm({"cond_stage_model.transformer.transformer_layer.resblocks.0.attn.bogus.weight": 0}, "sd2")


def _to_mindone(key: str, norm_cells: set) -> str:
    """Our tiny SD2 key in mindone's spelling (independent of the converter's rule table, from mindone's lists)."""
    import re

    text = "cond_stage_model.model."
    if key.startswith(text):
        rest = key[len(text) :]
        top = {"token_embedding.weight": "embedding_table", "positional_embedding": "positional_embedding",
               "ln_final.weight": "ln_final.gamma", "ln_final.bias": "ln_final.beta"}  # fmt: skip
        if rest in top:
            return "cond_stage_model.transformer." + top[rest]
        i, name = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", rest).groups()
        name = {"attn.in_proj_weight": "attn.attn.in_proj.weight", "attn.in_proj_bias": "attn.attn.in_proj.bias"}.get(
            name, name.replace("attn.out_proj", "attn.attn.out_proj").replace("mlp.", "")
        )
        name = name.replace("ln_1.weight", "ln_1.gamma").replace("ln_1.bias", "ln_1.beta")
        name = name.replace("ln_2.weight", "ln_2.gamma").replace("ln_2.bias", "ln_2.beta")
        return f"cond_stage_model.transformer.transformer_layer.resblocks.{i}.{name}"
    module, leaf = key.rsplit(".", 1)
    if module in norm_cells:
        leaf = {"weight": "gamma", "bias": "beta"}[leaf]
    module = re.sub(r"\.in_layers\.0$", ".in_layers_norm", module)
    module = re.sub(r"\.out_layers\.0$", ".out_layers_norm", module)
    module = re.sub(r"\.in_layers\.2$", ".in_layers_conv.conv", module)
    module = re.sub(r"\.out_layers\.3$", ".out_layers_conv.conv", module)
    module = re.sub(r"\.(skip_connection|op)$", r".\1.conv", module)
    module = re.sub(
        r"^(model\.diffusion_model\.(input_blocks\.0\.0|output_blocks\.\d+\.\d+\.conv|out\.2))$", r"\1.conv", module
    )
    return f"{module}.{leaf}"


def test_mindone_file_loads_into_our_model(tmp_path):
    """A tiny SD2 checkpoint written in mindone's naming loads strictly and bit-exactly through the normal reader."""
    from ldm.io.checkpoint import write_state_dict
    from ldm.io.loading import cell_state_dict
    from ldm.io.model_io import load_pretrained
    from ldm.models.diffusion import build_model_from_config
    from ldm.models.layers import GroupNorm, LayerNorm
    from ldm.util import CONFIG_DIR, load_config

    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    model = build_model_from_config(config)
    source = cell_state_dict(model)
    norms = {name for name, cell in model.cells_and_names() if isinstance(cell, (GroupNorm, LayerNorm))}
    state = {_to_mindone(k, norms): v for k, v in source.items()}
    assert len(state) == len(source) and is_mindone_state_dict(state)
    path = tmp_path / "mindone.ckpt"
    write_state_dict(path, state)
    fresh = build_model_from_config(config)
    load_pretrained(fresh, path)
    loaded = cell_state_dict(fresh)
    assert all(np.array_equal(loaded[k], source[k]) for k in source)
