"""KL-VAE: parity with diffusers ``AutoencoderKL``, the diffusers key map, graph mode, full-size key coverage.

Tolerance: outputs are compared as max|ours - ref| / max|ref| <= 1e-5. Both sides compute in float32 with the same
formulas; the only differences are convolution/matmul summation orders in oneDNN vs. torch, which stay around 1e-6
of the output scale for these depths. A wrong key, a swapped decoder level or a mis-padded downsample gives O(1).
"""

import time

import mindspore as ms
import numpy as np
import pytest

from ldm.io.vae_keys import diffusers_to_ldm, ldm_to_diffusers
from ldm.models.autoencoder import AutoencoderKL, kl_divergence, sample_latent

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

RTOL = 1e-5
TINY_LAYOUT = {"num_levels": 2, "num_res_blocks": 2}
TINY_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
# Stability's first_stage_config for SD 1.x and 2.x (v1-inference.yaml / v2-inference*.yaml).
SD_DDCONFIG = {**TINY_DDCONFIG, "resolution": 256, "ch": 128, "ch_mult": [1, 2, 4, 4]}


def _diffusers_vae(block_out_channels, layers_per_block, sample_size):
    n = len(block_out_channels)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
    )


def _rel_err(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _load(net, state_dict):
    """Strict load: identical key sets and shapes, then copy every array in."""
    params = dict(net.parameters_and_names())
    missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    for name, param in params.items():
        assert tuple(param.shape) == state_dict[name].shape, name
        param.set_data(ms.Tensor(np.ascontiguousarray(state_dict[name], dtype=np.float32)))


@pytest.fixture(scope="module")
def tiny():
    """(diffusers VAE, our VAE with its weights, diffusers state dict); every tensor re-randomised so norms,
    biases and the attention all matter."""
    torch.manual_seed(0)
    ref = _diffusers_vae((32, 64), 2, 32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_((1.0 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    sd = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
    ours = AutoencoderKL(TINY_DDCONFIG, embed_dim=4)
    _load(ours, diffusers_to_ldm(sd, **TINY_LAYOUT))
    return ref, ours, sd


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    return x, noise


def test_encode_matches_diffusers(tiny, inputs):
    ref, ours, _ = tiny
    x, _ = inputs
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = ours.encode(ms.Tensor(x))
    assert mean.shape == (2, 4, 16, 16) and logvar.shape == (2, 4, 16, 16)
    err_mean = _rel_err(mean.asnumpy(), dist.mean.numpy())
    err_logvar = _rel_err(logvar.asnumpy(), dist.logvar.numpy())
    print(f"encode rel err: mean {err_mean:.2e}, logvar {err_logvar:.2e}")
    assert err_mean <= RTOL and err_logvar <= RTOL


def test_decode_matches_diffusers(tiny, inputs):
    ref, ours, _ = tiny
    _, noise = inputs
    with torch.no_grad():
        image = ref.decode(torch.from_numpy(noise)).sample.numpy()
    ours_image = ours.decode(ms.Tensor(noise)).asnumpy()
    assert ours_image.shape == (2, 3, 32, 32)
    err = _rel_err(ours_image, image)
    print(f"decode rel err: {err:.2e}")
    assert err <= RTOL


def test_posterior_helpers(tiny, inputs):
    """Sample and KL follow diffusers' DiagonalGaussianDistribution (same formulas as LDM's)."""
    ref, ours, _ = tiny
    x, noise = inputs
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = ours.encode(ms.Tensor(x))
    z = sample_latent(mean, logvar, ms.Tensor(noise)).asnumpy()
    z_ref = (dist.mean + dist.std * torch.from_numpy(noise)).numpy()
    kl = kl_divergence(mean, logvar).asnumpy()
    assert kl.shape == (2,)
    assert _rel_err(z, z_ref) <= RTOL
    assert _rel_err(kl, dist.kl().numpy()) <= RTOL


def test_logvar_is_clamped(tiny, inputs):
    """A huge logvar bias must saturate at LDM's bounds [-30, 20], not overflow exp()."""
    _, ours, _ = tiny
    x, _ = inputs
    bias = ours.quant_conv.bias
    saved = bias.asnumpy().copy()
    try:
        for fill, bound in ((1e3, 20.0), (-1e3, -30.0)):
            new = saved.copy()
            new[4:] = fill
            bias.set_data(ms.Tensor(new))
            _, logvar = ours.encode(ms.Tensor(x))
            np.testing.assert_array_equal(logvar.asnumpy(), np.full((2, 4, 16, 16), bound, np.float32))
    finally:
        bias.set_data(ms.Tensor(saved))


def test_key_round_trip_is_bitwise(tiny):
    _, _, sd = tiny
    ldm_sd = diffusers_to_ldm(sd, **TINY_LAYOUT)
    assert ldm_sd["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert ldm_sd["decoder.up.1.upsample.conv.weight"] is sd["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    back = ldm_to_diffusers(ldm_sd, **TINY_LAYOUT)
    assert back.keys() == sd.keys()
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert back[key].tobytes() == value.tobytes(), key


def test_legacy_attention_names_are_read(tiny):
    _, _, sd = tiny
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in sd.items():
        for new, old in legacy_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    expected = diffusers_to_ldm(sd, **TINY_LAYOUT)
    got = diffusers_to_ldm(legacy, **TINY_LAYOUT)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    with pytest.raises(KeyError, match="both map to"):
        diffusers_to_ldm({**sd, **legacy}, **TINY_LAYOUT)


def test_unknown_keys_raise():
    w = np.zeros((4,), np.float32)
    with pytest.raises(KeyError, match="encoder.down_blocks.5.resnets.0.norm1.weight"):
        diffusers_to_ldm({"encoder.down_blocks.5.resnets.0.norm1.weight": w}, **TINY_LAYOUT)
    with pytest.raises(KeyError, match="decoder.up.0.block.3.conv1.bias"):
        ldm_to_diffusers({"decoder.up.0.block.3.conv1.bias": w}, **TINY_LAYOUT)
    with pytest.raises(KeyError, match="encoder.conv_in.scale"):
        diffusers_to_ldm({"encoder.conv_in.scale": w}, **TINY_LAYOUT)


def test_bad_ddconfig_raises():
    with pytest.raises(ValueError, match="'attn_type'"):
        AutoencoderKL({**TINY_DDCONFIG, "attn_type": "vanilla"}, embed_dim=4)
    with pytest.raises(ValueError, match="'ch_mult'"):
        AutoencoderKL({k: v for k, v in TINY_DDCONFIG.items() if k != "ch_mult"}, embed_dim=4)


@pytest.fixture(scope="module")
def eager_outputs(tiny, inputs):
    """PyNative (reconstruction, mean, logvar), computed before any test switches to graph mode."""
    _, ours, _ = tiny
    x, noise = inputs
    return [t.asnumpy() for t in ours(ms.Tensor(x), ms.Tensor(noise))]


def test_graph_mode_matches_pynative(tiny, inputs, eager_outputs, graph_mode):
    _, ours, _ = tiny
    x, noise = inputs
    assert ms.get_context("mode") == ms.GRAPH_MODE
    graph_outputs = [t.asnumpy() for t in ours(ms.Tensor(x), ms.Tensor(noise))]
    for name, got, want in zip(("reconstruction", "mean", "logvar"), graph_outputs, eager_outputs):
        err = _rel_err(got, want)
        print(f"graph vs pynative {name}: {err:.2e}")
        assert err <= RTOL, name


def test_full_size_keys_shapes_and_param_count():
    """SD 1.x/2.x VAE: our parameter names are exactly what diffusers' own single-file converter reads from
    Stability checkpoints, our key map agrees with it, and every shape and the parameter count match."""
    start = time.perf_counter()
    with torch.device("meta"):
        ref = _diffusers_vae((128, 256, 512, 512), 2, 512)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = AutoencoderKL(SD_DDCONFIG, embed_dim=4)
    our_shapes = {name: tuple(p.shape) for name, p in ours.parameters_and_names()}
    layout = {"num_levels": 4, "num_res_blocks": 2}

    def shape_only(shapes):  # zero-stride arrays: right shapes, no memory
        return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}

    mapped = {k: v.shape for k, v in diffusers_to_ldm(shape_only(ref_shapes), **layout).items()}
    missing, unexpected = sorted(set(our_shapes) - set(mapped)), sorted(set(mapped) - set(our_shapes))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    assert mapped == our_shapes

    checkpoint = {f"first_stage_model.{k}": v for k, v in shape_only(our_shapes).items()}
    by_diffusers = single_file_utils.convert_ldm_vae_checkpoint(
        checkpoint, {"down_block_types": [0] * 4, "up_block_types": [0] * 4}
    )
    assert {k: v.shape for k, v in by_diffusers.items()} == ref_shapes
    assert {k: v.shape for k, v in ldm_to_diffusers(shape_only(our_shapes), **layout).items()} == ref_shapes

    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(int(np.prod(s)) for s in our_shapes.values())
    print(f"parameters: diffusers {n_ref:,}, ours {n_ours:,} ({time.perf_counter() - start:.1f} s)")
    assert n_ours == n_ref
