"""DDPM schedule parity with diffusers' DDPMScheduler (SD settings: scaled_linear 0.00085..0.012, 1000 steps).

Tolerance: alphas_cumprod is compared at 1e-6 relative because diffusers computes in float32 and we in float64;
add_noise/get_velocity (float32 on both sides) at 1e-6 relative.
"""

import numpy as np
import pytest

from ldm.schedule import alphas_cumprod, make_betas

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _reference():
    return diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


def test_alphas_cumprod_matches_diffusers():
    ref = _reference().alphas_cumprod.numpy().astype(np.float64)
    ours = alphas_cumprod(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert ours[0] == pytest.approx(1 - 0.00085) and ours.shape == (1000,)


def test_linear_schedule_differs_and_unknown_raises():
    assert not np.allclose(make_betas("linear"), make_betas("scaled_linear"))
    with pytest.raises(ValueError, match="unknown beta schedule 'cosine2'"):
        make_betas("cosine2")


@pytest.fixture(scope="module")
def tiny_ldm():
    from ldm.models.diffusion import build_model_from_config
    from ldm.util import CONFIG_DIR, load_config

    return build_model_from_config(load_config(CONFIG_DIR / "tiny/sd2-tiny-v.yaml"))


def test_q_sample_and_velocity_match_diffusers(tiny_ldm):
    """LatentDiffusion.q_sample / get_v vs DDPMScheduler.add_noise / get_velocity (float32 both sides, 1e-6 rel)."""
    import mindspore as ms

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 4, 8, 8), dtype=np.float32)
    noise = rng.standard_normal((4, 4, 8, 8), dtype=np.float32)
    t = np.array([0, 250, 999, 611], dtype=np.int32)
    ref = _reference()
    tx, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t.astype(np.int64))
    want_xt = ref.add_noise(tx, tn, tt).numpy()
    want_v = ref.get_velocity(tx, tn, tt).numpy()
    got_xt = tiny_ldm.q_sample(ms.Tensor(x0), ms.Tensor(t), ms.Tensor(noise)).asnumpy()
    got_v = tiny_ldm.get_v(ms.Tensor(x0), ms.Tensor(noise), ms.Tensor(t)).asnumpy()
    np.testing.assert_allclose(got_xt, want_xt, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-6, atol=1e-6)
    assert tiny_ldm.parameterization == "v"
    target = tiny_ldm.training_target(ms.Tensor(x0), ms.Tensor(noise), ms.Tensor(t)).asnumpy()
    np.testing.assert_array_equal(target, got_v)
