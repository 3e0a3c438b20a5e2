"""Text encoders vs transformers' CLIPTextModel (tiny random configs), key maps, and full-size key/shape coverage.

Weights go transformers -> ``ldm.io.text_encoder_keys`` -> our cells, both run on the same token ids and outputs are
compared with a relative tolerance of 1e-5 (max |diff| / max |ref|): both sides are float32 with the same operations,
only summation order and the softmax/GELU kernels differ (~1e-7 relative per op, a few layers deep).
"""

import mindspore as ms
import numpy as np
import pytest

from ldm.io.text_encoder_keys import (
    HF_POSITION_IDS,
    checkpoint_ignored_keys,
    checkpoint_to_ldm,
    diffusers_to_ldm,
    ldm_to_diffusers,
)
from ldm.models.text_encoders import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.tokenizer import EOT_ID

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(width=32, heads=4)
PROMPTS = ["a photo of a cat", "", "an astronaut riding a horse on the moon, " * 10]
RTOL = 1e-5


def _hf_model(layers, act, eos_token_id=EOT_ID, seed=0):
    """Tiny random CLIPTextModel; every parameter (norms and biases too) is randomised so none is a no-op."""
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        eos_token_id=eos_token_id,
        attn_implementation="eager",
    )
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = "norm" in name and name.endswith("weight")
            p.copy_((1.0 if norm_weight else 0.0) + 0.1 * torch.randn_like(p))
    return model


def _hf_state(model) -> dict:
    """State dict in diffusers-file names: transformers 5 drops the ``text_model.`` prefix in memory."""
    return {"text_model." + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _load(cell, state_dict):
    """Set every parameter by its path name; the key sets and shapes must match exactly."""
    params = dict(cell.parameters_and_names())
    assert sorted(params) == sorted(state_dict)
    for name, p in params.items():
        assert tuple(p.shape) == state_dict[name].shape, name
        p.set_data(ms.Tensor(state_dict[name], ms.float32))


def _hf_run(model, ids, output_hidden_states=False):
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=output_hidden_states)


def _rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _ids(family):
    embedder = FrozenCLIPEmbedder(**TINY, layers=1) if family == "sd1" else FrozenOpenCLIPEmbedder(**TINY, layers=1)
    return embedder.tokenize(PROMPTS)


@pytest.mark.parametrize(
    "eos_token_id,mode", [(2, "pynative"), (EOT_ID, "graph")], ids=["legacy-eos2-pynative", "eos49407-graph"]
)
def test_sd1_matches_transformers(eos_token_id, mode, request):
    """Both transformers pooling rules (legacy argmax id, first 49407) pick our pooled position for tokenizer ids."""
    if mode == "graph":
        request.getfixturevalue("graph_mode")
    ref = _hf_model(3, "quick_gelu", eos_token_id)
    ours = FrozenCLIPEmbedder(**TINY, layers=3)
    _load(ours, diffusers_to_ldm(_hf_state(ref), "sd1"))
    ids = ours.tokenize(PROMPTS)
    out = _hf_run(ref, ids)
    context = ours(ms.Tensor(ids)).asnumpy()
    hidden, pooled = ours.transformer(ms.Tensor(ids))
    err = _rel_err(context, out.last_hidden_state.numpy())
    pool_err = _rel_err(pooled.asnumpy(), out.pooler_output.numpy())
    print(f"sd1 eos={eos_token_id} {mode}: context rel err {err:.2e}, pooled rel err {pool_err:.2e}")
    assert context.shape == (3, 77, 32) and err < RTOL and pool_err < RTOL
    np.testing.assert_array_equal(hidden.asnumpy(), context)


def test_sd2_matches_transformers(graph_mode):
    """Graph mode, as in training: our SD2 cell vs a CLIPTextModel with the same number of layers."""
    ref = _hf_model(2, "gelu")
    ours = FrozenOpenCLIPEmbedder(**TINY, layers=2)
    _load(ours, diffusers_to_ldm(_hf_state(ref), "sd2"))
    ids = ours.tokenize(PROMPTS)
    out = _hf_run(ref, ids)
    hidden, pooled = ours.model(ms.Tensor(ids))
    err = _rel_err(hidden.asnumpy(), out.last_hidden_state.numpy())
    pool_err = _rel_err(pooled.asnumpy(), out.pooler_output.numpy())
    print(f"sd2: context rel err {err:.2e}, pooled rel err {pool_err:.2e}")
    assert err < RTOL and pool_err < RTOL


def test_sd2_penultimate_layer():
    """A 3-block checkpoint (with text_projection/logit_scale, as Stability's) into our 2-block SD2 embedder gives
    final_layer_norm(hidden_states[-2]) of the 3-layer reference: Stability's layer="penultimate"."""
    ref = _hf_model(3, "gelu", seed=1)
    checkpoint = diffusers_to_ldm(_hf_state(ref), "sd2")
    checkpoint["model.text_projection"] = np.zeros((32, 32), np.float32)
    checkpoint["model.logit_scale"] = np.zeros((), np.float32)
    state = checkpoint_to_ldm(checkpoint, "sd2", layers=2)
    ours = FrozenOpenCLIPEmbedder(**TINY, layers=2)
    assert set(checkpoint) - set(state) == set(checkpoint_ignored_keys(ours.family, ours.layers))
    _load(ours, state)
    ids = ours.tokenize(PROMPTS)
    out = _hf_run(ref, ids, output_hidden_states=True)
    with torch.no_grad():
        want = ref.final_layer_norm(out.hidden_states[-2]).numpy()
    err = _rel_err(ours(ms.Tensor(ids)).asnumpy(), want)
    print(f"sd2 penultimate: rel err {err:.2e}")
    assert err < RTOL
    assert _rel_err(ours(ms.Tensor(ids)).asnumpy(), out.last_hidden_state.numpy()) > 1e-2  # not the last layer


def test_tokenize_padding_and_pooling_position():
    sd1, sd2 = _ids("sd1"), _ids("sd2")
    assert sd1.dtype == np.int32 and sd1.shape == (3, 77)
    np.testing.assert_array_equal(sd1[:, :2], sd2[:, :2])
    assert sd1[1, 2:].tolist() == [EOT_ID] * 75 and sd2[1, 2:].tolist() == [0] * 75
    assert sd1[2, -1] == sd2[2, -1] == EOT_ID
    assert FrozenCLIPEmbedder(**TINY, layers=1).context_dim == 32


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_float16_compute_close_to_float32(family):
    """dtype=float16 runs the Dense layers (and SD2's fused in_proj) in fp16: ~1e-3 relative error, 2e-2 allowed."""
    act, embedder = ("quick_gelu", FrozenCLIPEmbedder) if family == "sd1" else ("gelu", FrozenOpenCLIPEmbedder)
    state = diffusers_to_ldm(_hf_state(_hf_model(2, act)), family)
    ids = ms.Tensor(_ids(family))
    outs = []
    for dtype in (ms.float32, ms.float16):
        ours = embedder(**TINY, layers=2, dtype=dtype)
        _load(ours, state)
        outs.append(ours(ids).asnumpy().astype(np.float32))
    err = _rel_err(outs[1], outs[0])
    print(f"{family} fp16 vs fp32: rel err {err:.2e}")
    assert np.isfinite(outs[1]).all() and 0 < err < 2e-2


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_key_maps_are_inverses(family):
    hf = _hf_state(_hf_model(2, "gelu"))
    hf[HF_POSITION_IDS] = np.arange(77)[None]  # as in some diffusers/Stability files; dropped on import
    ours = diffusers_to_ldm(hf, family)
    unprefixed = diffusers_to_ldm({k[len("text_model.") :]: v for k, v in hf.items()}, family)  # transformers>=5
    assert sorted(unprefixed) == sorted(ours)
    back = ldm_to_diffusers(ours, family)
    assert sorted(back) == sorted(k for k in hf if k != HF_POSITION_IDS)
    for k, v in back.items():
        np.testing.assert_array_equal(v, hf[k])
    again = diffusers_to_ldm(back, family)
    assert sorted(again) == sorted(ours)
    for k, v in again.items():
        np.testing.assert_array_equal(v, ours[k])
    prefix = "transformer.text_model." if family == "sd1" else "model.transformer.resblocks."
    assert all(k.startswith(prefix) or family == "sd2" and k.startswith("model.") for k in ours)
    if family == "sd2":
        qkv = [hf[f"text_model.encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]
        np.testing.assert_array_equal(ours["model.transformer.resblocks.1.attn.in_proj_weight"], np.concatenate(qkv))


def test_key_maps_reject_unknown_keys():
    x = np.zeros(1, np.float32)
    with pytest.raises(KeyError, match="text_model.encoder.layers.0.self_attn.qq_proj.weight"):
        diffusers_to_ldm({"text_model.encoder.layers.0.self_attn.qq_proj.weight": x}, "sd2")
    with pytest.raises(KeyError, match="text_projection.weight"):
        diffusers_to_ldm({"text_projection.weight": x}, "sd1")
    with pytest.raises(KeyError, match="self_attn.k_proj.bias is missing"):
        diffusers_to_ldm({f"text_model.encoder.layers.0.self_attn.{p}_proj.bias": x for p in "qv"}, "sd2")
    with pytest.raises(KeyError, match="model.ln_final.weight"):
        ldm_to_diffusers({"model.ln_final.weight": x}, "sd1")
    with pytest.raises(KeyError, match="resblocks.0.attn.in_proj"):
        ldm_to_diffusers({"model.transformer.resblocks.0.attn.in_proj": x}, "sd2")
    with pytest.raises(KeyError, match="resblocks.24.ln_1.weight"):
        checkpoint_to_ldm({"model.transformer.resblocks.24.ln_1.weight": x}, "sd2")
    with pytest.raises(ValueError, match="family"):
        diffusers_to_ldm({}, "sdxl")
    assert checkpoint_to_ldm({"model.transformer.resblocks.23.ln_1.weight": x, "model.logit_scale": x}, "sd2") == {}
    assert checkpoint_ignored_keys("sd1") == ("transformer." + HF_POSITION_IDS,)


def _meta_state(config) -> tuple[dict, int]:
    """Key -> zero-stride uint8 array of the parameter's shape, from a CLIPTextModel built on the meta device."""
    with torch.device("meta"):
        model = transformers.CLIPTextModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    count = sum(p.numel() for p in model.parameters())
    return {k: np.broadcast_to(np.zeros((), np.uint8), s) for k, s in shapes.items()}, count


def _full_size_shapes(embedder) -> dict:
    with ms.nn.utils.no_init_parameters():  # shapes only: skip initialising ~1.4 GB of SD2 weights
        return {name: tuple(p.shape) for name, p in embedder().parameters_and_names()}


SD15_CONFIG = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"
)
SD2_CONFIG = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
)


@pytest.mark.parametrize(
    "family,config,embedder", [("sd1", SD15_CONFIG, FrozenCLIPEmbedder), ("sd2", SD2_CONFIG, FrozenOpenCLIPEmbedder)]
)
def test_full_size_coverage(family, config, embedder):
    """SD1.5 / SD2 text-encoder configs: converted keys and shapes cover our full-size embedder exactly."""
    hf, hf_count = _meta_state(transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config))
    converted = diffusers_to_ldm(hf, family)
    expected = _full_size_shapes(embedder)
    assert sorted(set(expected) - set(converted)) == []  # missing
    assert sorted(set(converted) - set(expected)) == []  # unexpected
    assert {k: v.shape for k, v in converted.items()} == expected
    count = sum(int(np.prod(s)) for s in expected.values())
    print(f"{family}: {len(expected)} tensors, {count:,} parameters (transformers: {hf_count:,})")
    assert count == hf_count


def test_stability_sd2_checkpoint_coverage():
    """A full OpenCLIP ViT-H/14 text tower (24 blocks, text_projection, logit_scale) imports into our 23 blocks with
    exactly ``checkpoint_ignored_keys`` left over."""
    hf, _ = _meta_state(transformers.CLIPTextConfig(vocab_size=49408, **{**SD2_CONFIG, "num_hidden_layers": 24}))
    checkpoint = diffusers_to_ldm(hf, "sd2")
    checkpoint["model.text_projection"] = np.zeros((1024, 1024), np.uint8)
    checkpoint["model.logit_scale"] = np.zeros((), np.uint8)
    state = checkpoint_to_ldm(checkpoint, "sd2")
    assert {k: v.shape for k, v in state.items()} == _full_size_shapes(FrozenOpenCLIPEmbedder)
    assert sorted(set(checkpoint) - set(state)) == sorted(checkpoint_ignored_keys("sd2"))
    assert len(checkpoint_ignored_keys("sd2")) == 14
