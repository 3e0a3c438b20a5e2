"""UNetModel against diffusers' UNet2DConditionModel, the diffusers<->LDM key map, graph mode and full-size layouts.

Tolerance: both sides run in float32 with the same weights and inputs; they differ only in the order of float
operations (fused SDPA vs. explicit softmax, oneDNN vs. ATen convolutions), so outputs agree to a few float32 ulps
of the output scale (measured: ~1-2e-6). We require max|ours - ref| / max|ref| <= 1e-5; a wrong formula exceeds
it by orders of magnitude (measured: sin/cos swapped in the timestep embedding gives 2e-1). Differences that matter
only for tiny variances, such as a GroupNorm eps of 1e-5 instead of 1e-6, stay below it with these random weights.
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import functools

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from mindspore.nn.utils import no_init_parameters

from ldm.io import unet_keys
from ldm.models.unet import SD1_UNET_CONFIG, SD2_UNET_CONFIG, UNetModel

RTOL = 1e-5

# Tiny SD1-style UNet: conv projections, heads given as a count (diffusers' ``attention_head_dim`` is the number
# of heads here), 2 ResBlocks per level, attention at level 0 only, so the level-1 upsampler is output_blocks.2.1.
TINY_SD1 = dict(
    ours=dict(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=(1,),
        num_res_blocks=2,
        channel_mult=(1, 2),
        num_heads=2,
        context_dim=24,
    ),
    diffusers=dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=2,
    ),
)
# Tiny SD2-style UNet: linear projections, 16 channels per head (diffusers wants heads per level), 1 ResBlock per
# level, two transformer blocks per SpatialTransformer, attention at level 1 only (upsampler: output_blocks.1.2).
TINY_SD2 = dict(
    ours=dict(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=(2,),
        num_res_blocks=1,
        channel_mult=(1, 2),
        num_head_channels=16,
        context_dim=40,
        use_linear_in_transformer=True,
        transformer_depth=2,
    ),
    diffusers=dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=40,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=2,
    ),
)
# Published diffusers configs of the full-size UNets (runwayml SD 1.5, stabilityai SD 2 base).
FULL_SD1 = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=8,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
FULL_SD2 = dict(FULL_SD1, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)


def layout(cfg):
    return {k: cfg[k] for k in ("num_res_blocks", "channel_mult", "attention_resolutions")}


def randomize_(model, seed):
    """Give every parameter random values (norm scales near 1, biases near 0, weights ~ 1/sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def load_into(net, state_dict):
    """Copy numpy arrays into the net's parameters; the key sets and every shape must match exactly."""
    params = {p.name: p for p in net.get_parameters()}
    missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    for name, p in params.items():
        assert tuple(p.shape) == state_dict[name].shape, (name, p.shape, state_dict[name].shape)
        p.set_data(ms.Tensor(state_dict[name]))


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def make_inputs(cfg, batch, seed):
    r = np.random.default_rng(seed)
    x = r.standard_normal((batch, 4, 8, 8)).astype(np.float32)
    context = r.standard_normal((batch, 5, cfg["ours"]["context_dim"])).astype(np.float32)
    return x, context


def run_ours(net, x, t, context):
    return net(ms.Tensor(x), ms.Tensor(np.asarray(t, np.int64)), ms.Tensor(context)).asnumpy()


def run_ref(ref, x, t, context):
    with torch.no_grad():
        return ref(torch.from_numpy(x), torch.tensor(t), torch.from_numpy(context)).sample.numpy()


@functools.cache
def build_pair(name):
    """(config, diffusers reference, our UNet loaded with the converted reference weights, reference state dict)."""
    cfg = TINY_SD1 if name == "sd1" else TINY_SD2
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**cfg["diffusers"]).eval()
    randomize_(ref, seed=1)
    sd = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
    net = UNetModel(**cfg["ours"])
    net.set_train(False)
    load_into(net, unet_keys.diffusers_to_ldm(sd, **layout(cfg["ours"])))
    return cfg, ref, net, sd


@pytest.fixture(params=["sd1", "sd2"])
def pair(request):
    return build_pair(request.param)


@functools.cache
def outputs(name, timesteps):
    """(input, context, reference output, our PyNative output) for a batch of len(timesteps) different samples."""
    cfg, ref, net, _ = build_pair(name)
    x, context = make_inputs(cfg, len(timesteps), seed=sum(timesteps))
    return x, context, run_ref(ref, x, list(timesteps), context), run_ours(net, x, timesteps, context)


# Batch 1 at t=10 and batch 2 at t=(750, 999): three timesteps, and per-sample timesteps within a batch.
@pytest.mark.parametrize("timesteps", [(10,), (750, 999)], ids=["b1", "b2"])
def test_matches_diffusers(pair, timesteps):
    cfg = pair[0]
    x, _, expected, got = outputs("sd1" if cfg is TINY_SD1 else "sd2", timesteps)
    assert got.shape == x.shape
    assert np.abs(expected).max() > 0.1  # the reference output is not trivially small
    if len(timesteps) == 2:  # the two samples really differ, so mixing up the batch would show
        assert rel_err(expected[0], expected[1]) > 0.1
    err = rel_err(got, expected)
    print(f"{'sd1' if cfg is TINY_SD1 else 'sd2'} t={timesteps}: max rel err {err:.2e}")
    assert err <= RTOL


def test_key_map_round_trip(pair):
    cfg, _, net, sd = pair
    ldm_sd = unet_keys.diffusers_to_ldm(sd, **layout(cfg["ours"]))
    back = unet_keys.ldm_to_diffusers(ldm_sd, **layout(cfg["ours"]))
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
    ours = {p.name: p.asnumpy() for p in net.get_parameters()}
    again = unet_keys.diffusers_to_ldm(unet_keys.ldm_to_diffusers(ours, **layout(cfg["ours"])), **layout(cfg["ours"]))
    assert list(again) == list(ours)


def test_key_map_rejects_unknown_keys():
    sd = {"down_blocks.0.resnets.0.bogus.weight": np.zeros(1)}
    with pytest.raises(KeyError, match="down_blocks.0.resnets.0.bogus.weight"):
        unet_keys.diffusers_to_ldm(sd)
    # SD layout: level 3 has no attention, so this key cannot be placed even though its pattern looks valid.
    with pytest.raises(KeyError, match="down_blocks.3.attentions.0.norm.weight"):
        unet_keys.diffusers_to_ldm({"down_blocks.3.attentions.0.norm.weight": np.zeros(1)})
    with pytest.raises(KeyError, match="output_blocks.2.2.conv.weight"):
        unet_keys.ldm_to_diffusers({"output_blocks.2.2.conv.weight": np.zeros(1)})
    assert "output_blocks.2.1.conv.weight" in unet_keys.diffusers_to_ldm({"up_blocks.0.upsamplers.0.conv.weight": 0})


def test_graph_mode_matches_pynative():
    """The same cell compiled in GRAPH_MODE agrees with PyNative (and so with diffusers) to 1e-5 relative."""
    _, _, net, _ = build_pair("sd1")
    x, context, expected, eager = outputs("sd1", (750, 999))
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = run_ours(net, x, (750, 999), context)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    err = rel_err(graph, eager)
    print(f"graph vs pynative: max rel err {err:.2e}")
    assert err <= RTOL
    assert rel_err(graph, expected) <= RTOL


def test_float16_compute_close_to_float32():
    """dtype="float16" runs Dense/Conv in fp16 (norms, softmax in fp32) and returns the input dtype.

    fp16 keeps ~11 significant bits, so after ~30 layers we allow 1e-2 relative (measured ~3e-3); an fp16 softmax
    or norm overflow would give inf/NaN or O(1) errors.
    """
    cfg, _, net, _ = build_pair("sd2")
    x, context, expected, _ = outputs("sd2", (10,))
    half = UNetModel(**cfg["ours"], dtype="float16")
    half.set_train(False)
    load_into(half, {p.name: p.asnumpy() for p in net.get_parameters()})
    got = half(ms.Tensor(x), ms.Tensor(np.array([10])), ms.Tensor(context))
    assert got.dtype == ms.float32
    err = rel_err(got.asnumpy(), expected)
    print(f"float16 compute vs diffusers fp32: max rel err {err:.2e}")
    assert err <= 1e-2


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_full_size_layout_matches_diffusers(name):
    """Full SD1.5 / SD2 UNets: converted diffusers names and shapes equal ours exactly, and parameter counts agree.

    Neither side allocates weights: diffusers is built on torch's meta device, ours under ``no_init_parameters``
    (checked: every parameter still holds its lazy initializer), and the converter is fed zero-stride arrays.
    """
    ref_cfg, ours_cfg = (FULL_SD1, SD1_UNET_CONFIG) if name == "sd1" else (FULL_SD2, SD2_UNET_CONFIG)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**ref_cfg)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    with no_init_parameters():
        net = UNetModel(**ours_cfg)
    params = list(net.get_parameters())
    assert all(p.has_init for p in params), "parameters were materialised"
    ours = {p.name: tuple(p.shape) for p in params}

    stubs = {k: np.broadcast_to(np.float32(0), s) for k, s in ref_shapes.items()}
    converted = {k: v.shape for k, v in unet_keys.diffusers_to_ldm(stubs, **layout(ours_cfg)).items()}
    missing, unexpected = sorted(set(ours) - set(converted)), sorted(set(converted) - set(ours))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    assert {k: s for k, s in converted.items() if ours[k] != s} == {}
    n_ours = sum(int(np.prod(s)) for s in ours.values())
    n_ref = sum(int(np.prod(s)) for s in ref_shapes.values())
    print(f"{name}: ours {n_ours:,} parameters, diffusers {n_ref:,}")
    assert n_ours == n_ref


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_heads=-1), "exactly one of num_heads and num_head_channels"),
        (dict(num_head_channels=64), "exactly one of num_heads and num_head_channels"),
        (dict(num_heads=3), "not divisible by num_heads=3"),
        (dict(model_channels=48), "not divisible by the 32 GroupNorm groups"),
        (dict(attention_resolutions=(32, 16, 8)), "match no level"),
        (dict(context_dim=None), "context_dim is required"),
        (dict(use_spatial_transformer=False), "use_spatial_transformer=False"),
        (dict(dtype="fp8"), "dtype must be one of"),
    ],
)
def test_rejects_inconsistent_arguments(change, message):
    with pytest.raises(ValueError, match=message):
        UNetModel(**dict(SD1_UNET_CONFIG, **change))
