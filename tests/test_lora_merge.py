"""ldm.lora.merge: merge into base weights (upl), lpl and exact/truncated SVD combination."""

import numpy as np
import pytest

from ldm.io.checkpoint import CheckpointError
from ldm.lora.adapter import delta_weight, make_adapter, modules
from ldm.lora.merge import combine_lpl, combine_svd, merge_into_base
from tests.lora_files import deltas, random_adapter, te_shapes, unet_shapes


def test_merge_into_base(rng):
    adapter = random_adapter("sd2", rng)
    base = {}
    for path, (down, up, _) in modules(adapter).items():
        key = path[: -len("_lora")] + "_weight" if path.endswith(".in_proj_lora") else path + ".weight"
        base[key] = rng.normal(size=(up.shape[0], down.shape[1])).astype(np.float32)
    base["model.diffusion_model.out.2.bias"] = np.ones(4, np.float32)
    merged = merge_into_base(base, adapter, weight=0.7)
    assert merged["model.diffusion_model.out.2.bias"] is base["model.diffusion_model.out.2.bias"]
    for path, module in modules(adapter).items():
        key = path[: -len("_lora")] + "_weight" if path.endswith(".in_proj_lora") else path + ".weight"
        np.testing.assert_allclose(merged[key], base[key] + 0.7 * delta_weight(*module), rtol=1e-6, atol=1e-5)
    base.pop("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
    with pytest.raises(CheckpointError, match="in_proj_weight"):
        merge_into_base(base, adapter)


def test_merge_1x1_conv_base(rng):
    d, u = rng.normal(size=(2, 32)).astype(np.float32), rng.normal(size=(32, 2)).astype(np.float32)
    adapter = make_adapter({"model.diffusion_model.middle_block.1.proj_in": (d, u, 2.0)}, {"family": "sd1"})
    base = {"model.diffusion_model.middle_block.1.proj_in.weight": np.zeros((32, 32, 1, 1), np.float32)}
    (w,) = merge_into_base(base, adapter).values()
    np.testing.assert_allclose(w[:, :, 0, 0], u.astype(np.float64) @ d, rtol=1e-6)


def test_lpl_is_weighted_sum_of_factors(rng):
    a = random_adapter("sd1", rng, shapes=te_shapes("sd1"), mixed=False)
    b = random_adapter("sd1", rng, shapes=te_shapes("sd1"), mixed=False)
    c = combine_lpl(a, b, 0.3, 0.6)
    ma, mb = modules(a), modules(b)
    for path, (down, up, alpha) in modules(c).items():
        np.testing.assert_allclose(down, 0.3 * ma[path].down + 0.6 * mb[path].down, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(up, 0.3 * ma[path].up + 0.6 * mb[path].up, rtol=1e-6, atol=1e-6)
        assert alpha == ma[path].alpha
    with pytest.raises(CheckpointError, match="same modules"):
        combine_lpl(a, random_adapter("sd1", rng, shapes=unet_shapes(False)))


def test_svd_full_rank_is_exact(rng):
    a = random_adapter("sd2", rng, rank=3)
    b = random_adapter("sd2", rng, rank=2, alpha=8.0, shapes={**unet_shapes(False), **te_shapes("sd2")})
    combined, report = combine_svd(a, b, 0.8, -1.5, rank=5 + 4)  # >= max rank_a + max rank_b
    da, db = deltas(a), deltas(b)
    for path, delta in deltas(combined).items():
        exact = 0.8 * da[path] + (-1.5 * db[path] if path in db else 0)
        scale = np.abs(exact).max()
        np.testing.assert_allclose(delta, exact, rtol=0, atol=1e-5 * scale, err_msg=path)
        assert report.per_module[path] < 1e-6
    assert report.overall < 1e-6 and modules(combined)[path].alpha == modules(combined)[path].down.shape[0]


def test_svd_low_rank_error_is_discarded_energy(rng):
    a = random_adapter("sd1", rng, rank=4, shapes=te_shapes("sd1"), mixed=False)
    b = random_adapter("sd1", rng, rank=4, shapes=te_shapes("sd1"), mixed=False)
    combined, report = combine_svd(a, b, 1.0, 0.5, rank=3)
    da, db = deltas(a), deltas(b)
    res, ref = 0.0, 0.0
    for path in da:
        s = np.linalg.svd(da[path] + 0.5 * db[path], compute_uv=False)
        expected = np.sqrt((s[3:] ** 2).sum() / (s**2).sum())
        assert report.per_module[path] == pytest.approx(expected, rel=1e-4)
        assert 0.05 < expected < 1
        res, ref = res + (s[3:] ** 2).sum(), ref + (s**2).sum()
        assert modules(combined)[path].down.shape[0] == 3
    assert report.overall == pytest.approx(np.sqrt(res / ref), rel=1e-4)


def test_merge_refuses_other_family_even_when_shapes_agree(rng):
    """An SD1 adapter that only touches UNet modules whose shapes an SD2 base shares must not merge silently: the
    family is checked where adapters meet base weights (merge_into_base serves the CLI merge and generation)."""
    adapter = random_adapter("sd1", rng, shapes=unet_shapes(extended=False), mixed=False)
    base = {}
    for path, (down, up, _) in modules(adapter).items():
        base[path + ".weight"] = rng.normal(size=(up.shape[0], down.shape[1])).astype(np.float32)
    base["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = np.zeros((96, 32), np.float32)
    with pytest.raises(CheckpointError, match="adapter family 'sd1' does not match the base model family 'sd2'"):
        merge_into_base(base, adapter)
    sd1_base = {k: v for k, v in base.items() if not k.startswith("cond_stage_model.")}
    sd1_base["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.ones(32, np.float32)
    assert set(merge_into_base(sd1_base, adapter)) == set(sd1_base)
