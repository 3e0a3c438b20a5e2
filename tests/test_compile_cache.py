"""MindSpore's compile cache is safe for training: a second process that reloads the compiled train step from the
cache computes exactly what the first (compiling) process computed.

Each run is a subprocess (this file as a script) training the tiny stand-in denoiser of ``test_train_step`` for 4
micro-steps with dynamic loss scaling, gradient accumulation and EMA, so every kind of state the step owns (moments,
accumulators, scaler, EMA, counters) is in the graph. Before the step was compiled as Cells owning their parameters,
the reloaded graph trained detached copies: a different first loss and all-zero gradients.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_training(cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, __file__, str(cache)], check=True, capture_output=True, text=True, env=env, timeout=900
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_reloaded_train_step_matches_the_compiling_run(tmp_path):
    cache = tmp_path / "compile_cache"
    first = run_training(cache)
    assert any(cache.rglob("*")), "the first run wrote no compile cache"
    second = run_training(cache)
    assert second == first
    assert all(n > 0 for n in first["grad_norms"])


def main(cache: str) -> None:
    import ldm  # noqa: F401, I001  (must precede mindspore)
    import numpy as np
    from mindspore import Tensor
    from test_train_step import AB, TinyDenoiser, make_batch

    from ldm.env import init_env
    from ldm.train import EMA, DiffusionLoss, NoiseSampler, TrainStep

    init_env("CPU", mode=0, threads=1, compile_cache_dir=cache, seed=0)
    net = TinyDenoiser()
    params = net.trainable()
    step = TrainStep(
        DiffusionLoss(net, AB),
        params,
        1e-2,
        loss_scaler="dynamic",
        init_scale=2.0**10,
        scale_window=2,
        grad_accum_steps=2,
        ema=EMA(params, decay=0.9, warmup_steps=0),
    )
    x0, context = make_batch(2)
    draws = NoiseSampler(0).draw(x0.shape)
    outs = [step(Tensor(x0), Tensor(context), *draws) for _ in range(4)]
    state = step.state_arrays()
    print(
        json.dumps(
            {
                "losses": [o.loss for o in outs],
                "grad_norms": [o.grad_norm for o in outs],
                "state_sums": {k: float(np.asarray(v, np.float64).sum()) for k, v in sorted(state.items())},
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
