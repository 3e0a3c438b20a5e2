"""Memory options on the tiny SD2 model: each is exact when off, and each states and meets its effect when on.

- attention slicing and VAE slicing compute every row/image with the same operations as without them; only oneDNN's
  blocking of a matmul/convolution over a smaller batch differs, so outputs agree to float32 rounding (measured
  ~2e-6 of the output scale). We require max|diff| <= 1e-5 * max|reference|; a slicing bug (a wrong chunk
  boundary, a slice used twice) changes whole rows by O(1);
- recompute repeats each UNet block's forward in the backward pass: the LoRA gradients must match those without
  it to float32 rounding (rtol 1e-6 of the largest gradient; a block left out of the graph gives 100% errors);
- memory-efficient attention runs the sliced forward (the same output as the plain path, required bit for bit) and
  a hand-written backward that recomputes each slice's scores: its input and weight gradients are the softmax
  gradient formula evaluated slice by slice, so they must match automatic differentiation of the plain path to
  float32 rounding (rtol 1e-6 of the largest gradient; a wrong term, e.g. a missing row-sum, gives O(1) errors);
- the plain attention's hand-written backward (``AttentionCore``, the row term taken as rowsum(g * out)) must match
  automatic differentiation of softmax(q k^T) v to float32 rounding (the same 1e-6 tolerance; a wrong or missing
  row term gives O(1) errors);
- releasing the text encoder after encoding every prompt batch ahead (what ``text_to_image.py`` does) must leave
  the very contexts the sampler gets unchanged (bit for bit); a batch that was not encoded ahead is an error;
- tiled VAE decode is approximate by design; what it promises is checked exactly: a latent no larger than a tile
  decodes unchanged, the output has the full size, and the region covered by the first tile alone equals
  decoding that tile on its own (to the same rounding tolerance).
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
from pathlib import Path

import mindspore as ms
from mindspore import ops
import numpy as np
import pytest

from ldm.lora import UNET_ATTENTION_TARGETS, inject_lora
from ldm.models.attention import AttentionCore, CrossAttention, MemoryEfficientAttention
from ldm.models.diffusion import build_model_from_config
from ldm.pipeline import GenerationSettings, Text2ImagePipeline
from ldm.util import load_config

CONFIG = Path(__file__).resolve().parents[1] / "ldm/configs/tiny/sd2-tiny.yaml"


ROUNDING = 1e-5


def assert_same_up_to_rounding(actual: np.ndarray, reference: np.ndarray) -> None:
    """max|actual - reference| <= ROUNDING * max|reference| (float32 rounding of a differently blocked kernel)."""
    assert actual.shape == reference.shape
    np.testing.assert_allclose(actual, reference, rtol=0, atol=ROUNDING * float(np.abs(reference).max()))


@pytest.fixture(scope="module")
def model():
    ms.set_seed(0)
    return build_model_from_config(load_config(CONFIG))


def _unet_inputs(model, batch: int = 2):
    rng = np.random.default_rng(1)
    x = ms.Tensor(rng.standard_normal((batch, 4, 16, 16), dtype=np.float32))
    t = ms.Tensor(np.array([10, 900][:batch], np.int32))
    context = ms.Tensor(rng.standard_normal((batch, 77, model.context_dim), dtype=np.float32))
    return x, t, context


def test_attention_slicing_is_exact(model):
    unet = model.model.diffusion_model
    inputs = _unet_inputs(model)
    reference = unet(*inputs).asnumpy()
    try:
        for size in (1, 3):  # 2 images x 2-4 heads: one row per slice, and slices that straddle images
            unet.set_attention_slice_size(size)
            assert_same_up_to_rounding(unet(*inputs).asnumpy(), reference)
    finally:
        unet.set_attention_slice_size(0)
    with pytest.raises(ValueError, match="attention_slice_size"):
        unet.set_attention_slice_size(-1)


def test_vae_slicing_is_exact(model):
    vae = model.first_stage_model
    z = ms.Tensor(np.random.default_rng(2).standard_normal((3, 4, 16, 16), dtype=np.float32))
    reference = vae.decode(z).asnumpy()
    try:
        vae.set_decode_memory_options(slicing=True)
        assert_same_up_to_rounding(vae.decode(z).asnumpy(), reference)
    finally:
        vae.set_decode_memory_options()


def test_vae_tiling_stitches_tiles(model):
    vae = model.first_stage_model
    f = vae.latent_factor
    z = ms.Tensor(np.random.default_rng(3).standard_normal((2, 4, 14, 12), dtype=np.float32))
    plain = vae.decode(z).asnumpy()
    try:
        vae.set_decode_memory_options(tile_latent_size=14)  # no side exceeds a tile: the plain decode
        np.testing.assert_array_equal(vae.decode(z).asnumpy(), plain)
        vae.set_decode_memory_options(tile_latent_size=8, slicing=True)  # stride 6: tiles at 0, 6 (and 12 down)
        tiled = vae.decode(z).asnumpy()
        first_tile = vae.decode(z[:, :, :8, :8]).asnumpy()
    finally:
        vae.set_decode_memory_options()
    assert tiled.shape == plain.shape
    keep = 6 * f - (8 * f - 6 * f)  # the first tile's pixels no neighbour blends into
    assert_same_up_to_rounding(tiled[:, :, :keep, :keep], first_tile[:, :, :keep, :keep])
    assert not np.array_equal(tiled, plain)  # approximate by design: per-tile GroupNorm statistics
    with pytest.raises(ValueError, match="tile_latent_size"):
        vae.set_decode_memory_options(tile_latent_size=1)


def _lora_grads(unet, inputs, params):
    def loss_fn(x, t, context):
        return (unet(x, t, context) ** 2).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, params)
    loss, grads = grad_fn(*inputs)
    return float(loss), [g.asnumpy() for g in grads]


def test_recompute_keeps_gradients():
    ms.set_seed(0)
    model = build_model_from_config(load_config(CONFIG))
    unet = model.model.diffusion_model
    inject_lora(unet, targets=UNET_ATTENTION_TARGETS, rank=2)
    rng = np.random.default_rng(4)
    params = [p for p in unet.get_parameters() if ".lora_" in p.name]
    for p in params:  # lora_up starts at zero; random values give every LoRA weight a gradient
        p.set_data(ms.Tensor(rng.standard_normal(p.shape, dtype=np.float32) * 0.1))
    for p in unet.get_parameters():
        p.requires_grad = ".lora_" in p.name
    inputs = _unet_inputs(model)
    loss, grads = _lora_grads(unet, inputs, params)
    unet.enable_recompute()
    assert unet.recompute_enabled
    loss_rc, grads_rc = _lora_grads(unet, inputs, params)
    assert loss_rc == pytest.approx(loss, rel=1e-6)
    scale = max(float(np.abs(g).max()) for g in grads)
    assert scale > 0
    for g, g_rc in zip(grads, grads_rc):
        np.testing.assert_allclose(g_rc, g, rtol=0, atol=1e-6 * scale)
    unet.set_memory_efficient_attention(True)  # the full-size recipe: recompute + memory-efficient attention
    try:
        loss_me, grads_me = _lora_grads(unet, inputs, params)
    finally:
        unet.set_memory_efficient_attention(False)
    assert loss_me == pytest.approx(loss, rel=1e-6)
    for g, g_me in zip(grads, grads_me):
        np.testing.assert_allclose(g_me, g, rtol=0, atol=1e-6 * scale)


def _attention_grads(attn, x, context):
    """Output, and gradients of a fixed random projection of it w.r.t. x, context and every weight."""
    probe = ms.Tensor(np.random.default_rng(6).standard_normal(attn(x, context).shape, dtype=np.float32))

    def loss_fn(x, context):
        return (attn(x, context) * probe).sum()

    weights = attn.trainable_params()
    _, (input_grads, weight_grads) = ms.value_and_grad(loss_fn, (0, 1), weights)(x, context)
    return attn(x, context).asnumpy(), [g.asnumpy() for g in (*input_grads, *weight_grads)]


@pytest.mark.parametrize("budget", [7 * 9, 2 * 7 * 9])  # one row (of 2 images x 3 heads) per slice, then two
def test_memory_efficient_attention_matches_plain(budget):
    ms.set_seed(0)
    attn = CrossAttention(24, 16, heads=3, dim_head=8)
    rng = np.random.default_rng(5)
    x = ms.Tensor(rng.standard_normal((2, 7, 24), dtype=np.float32))
    context = ms.Tensor(rng.standard_normal((2, 9, 16), dtype=np.float32))
    out, grads = _attention_grads(attn, x, context)
    attn.set_memory_efficient(True)
    attn.memory_efficient.score_budget = budget
    out_me, grads_me = _attention_grads(attn, x, context)
    np.testing.assert_array_equal(out_me, out)
    scale = max(float(np.abs(g).max()) for g in grads)
    for g, g_me in zip(grads, grads_me):
        np.testing.assert_allclose(g_me, g, rtol=0, atol=1e-6 * scale)
    attn.set_memory_efficient(False)
    assert attn.memory_efficient is None
    np.testing.assert_array_equal(attn(x, context).asnumpy(), out)


def test_attention_core_backward_matches_autodiff():
    rng = np.random.default_rng(7)
    q, k, v = (ms.Tensor(rng.standard_normal(shape, dtype=np.float32)) for shape in ((6, 7, 8), (6, 9, 8), (6, 9, 8)))
    probe = ms.Tensor(rng.standard_normal((6, 7, 8), dtype=np.float32))
    core = AttentionCore()

    def reference(q, k, v):
        return (ops.bmm(ops.softmax(ops.bmm(q, k.transpose(0, 2, 1)), axis=-1), v) * probe).sum()

    def ours(q, k, v):
        return (core(q, k, v)[0] * probe).sum()

    want = [g.asnumpy() for g in ms.grad(reference, (0, 1, 2))(q, k, v)]
    got = [g.asnumpy() for g in ms.grad(ours, (0, 1, 2))(q, k, v)]
    scale = max(float(np.abs(g).max()) for g in want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * scale)


@pytest.mark.slow  # a graph compile (~40 s here)
def test_memory_efficient_attention_in_graph_mode(graph_mode):
    """The custom backward also compiles: same output and gradients as the plain path under GRAPH_MODE."""
    test_memory_efficient_attention_matches_plain(7 * 9)


def test_memory_efficient_attention_slices_by_score_budget():
    q, k = ms.Tensor(np.zeros((10, 4096, 8), np.float32)), ms.Tensor(np.zeros((10, 4096, 8), np.float32))
    k77 = ms.Tensor(np.zeros((10, 77, 8), np.float32))
    mea = MemoryEfficientAttention()
    assert mea._rows_per_slice(q, k) == 1  # one head's 4096 x 4096 scores (64 MiB) at a time
    assert mea._rows_per_slice(q, k77) == 53  # cross-attention over 77 tokens: all rows in one slice


def test_released_text_encoder_gives_the_same_contexts(model):
    pipe = Text2ImagePipeline(model, sampler="dpm_solver_pp")
    prompts, negative = ["a red fox", "a red fox"], ["", ""]
    reference = [pipe.encode_prompts(batch).asnumpy() for batch in (prompts, negative)]
    text_encoder = model.cond_stage_model
    try:
        pipe.encode_ahead([prompts, negative])
        pipe.release_text_encoder()
        assert model.cond_stage_model is None
        for batch, expected in zip((prompts, negative), reference):
            np.testing.assert_array_equal(pipe.encode_prompts(batch).asnumpy(), expected)
        with pytest.raises(ValueError, match="not encoded ahead"):
            pipe(["a blue fox"], [""], settings=GenerationSettings(steps=1, height=32, width=32))
    finally:
        model.cond_stage_model = text_encoder  # the module's other tests use it
