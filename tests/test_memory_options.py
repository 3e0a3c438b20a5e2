"""Memory options on the tiny SD2 model: each is exact when off, and each states and meets its effect when on.

- attention slicing and VAE slicing compute every row/image with the same operations as without them; only oneDNN's
  blocking of a matmul/convolution over a smaller batch differs, so outputs agree to float32 rounding (measured
  ~2e-6 of the output scale). We require max|diff| <= 1e-5 * max|reference|; a slicing bug (a wrong chunk
  boundary, a slice used twice) changes whole rows by O(1);
- recompute repeats each UNet block's forward in the backward pass: the LoRA gradients must match those without
  it to float32 rounding (rtol 1e-6 of the largest gradient; a block left out of the graph gives 100% errors);
- tiled VAE decode is approximate by design; what it promises is checked exactly: a latent no larger than a tile
  decodes unchanged, the output has the full size, and the region covered by the first tile alone equals
  decoding that tile on its own (to the same rounding tolerance).
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from ldm.lora import UNET_ATTENTION_TARGETS, inject_lora
from ldm.models.diffusion import build_model_from_config
from ldm.util import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "sd2-tiny.yaml"


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
