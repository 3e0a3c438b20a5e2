"""Checkpoint and strength selection (ldm.metrics.selection): on a constructed case whose reference images come from
the adapter itself, the adapter at scale 1 ranks above the same adapter at scale 0 and above the base; a zero adapter
has no prior drift; the Pareto front and the drift limit follow the stated rule; the report and plot are written.

Generation is the real one (the tiny SD2 with an adapter merged at each scale, PyNative, a few sampler steps); the
features are 8x8 average-pooled pixels in place of the Inception network, which is slow on a CPU and which the choice
does not depend on (the CLI and ``make demo`` use the Inception network)."""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest

from ldm.env import set_seed
from ldm.lora.adapter import make_adapter, write_adapter
from ldm.metrics.select_run import AdapterRenderer
from ldm.metrics.selection import Candidate, mark_choice, run_adapters, score_candidates, table, write_report
from ldm.models.diffusion import build_model_from_config
from ldm.pipeline import GenerationSettings
from ldm.util import CONFIG_DIR, load_config

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
PRIOR = ["a yellow star", "a white cat"]


def pooled(images: np.ndarray) -> np.ndarray:
    """8x8 average-pooled pixels, flattened: a cheap feature space in which images that look alike are close."""
    x = images.astype(np.float64) / 255.0
    n, h, w, c = x.shape
    return x.reshape(n, 8, h // 8, 8, w // 8, c).mean(axis=(2, 4)).reshape(n, -1)


@pytest.fixture(scope="module")
def renderer():
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the tiny model samples faster op by op than it compiles
    set_seed(0)
    model = build_model_from_config(load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml"))
    yield AdapterRenderer(model, GenerationSettings(steps=2, scale=3.0, height=32, width=32), n_samples=1)
    ms.set_context(mode=mode)


def _adapter(path, rng, zero=False):
    """An adapter on every attention projection of the tiny UNet (strong enough to change the images)."""
    mods = {}
    for block, c in (("input_blocks.1.1", 32), ("middle_block.1", 64), ("output_blocks.3.1", 32)):
        for name in ("attn1.to_out.0", "attn2.to_out.0"):
            up = np.zeros((c, 4), np.float32) if zero else rng.normal(0, 1.0, (c, 4)).astype(np.float32)
            mods[f"model.diffusion_model.{block}.transformer_blocks.0.{name}"] = (
                rng.normal(0, 1.0, (4, c)).astype(np.float32),
                up,
                4.0,
            )
    write_adapter(path, make_adapter(mods, {"family": "sd2", "context_dim": 32, "parameterization": "eps"}))
    return str(path)


@pytest.mark.slow
def test_adapter_beats_itself_at_scale_zero_and_zero_adapter_has_no_drift(renderer, tmp_path):
    """The real renderer (about 5 minutes on a shared 2-core machine; the stand-in test below is the fast variant)."""
    rng = np.random.default_rng(0)
    ckpt = tmp_path / "run/ckpt"
    ckpt.mkdir(parents=True)
    trained = _adapter(ckpt / "lora-000010.safetensors", rng)
    _adapter(ckpt / "lora-000005.safetensors", rng, zero=True)
    # real images of the "concept": what the trained adapter draws, at seeds the scoring does not use
    reference = pooled(renderer(trained, 1.0, PROMPTS * 2, 1000))  # 6 images
    adapters = run_adapters([str(tmp_path / "run")])
    assert [s for s, _ in adapters] == [5, 10]
    candidates = score_candidates(
        adapters, [0.0, 1.0], renderer, pooled, PROMPTS, PRIOR, reference, seed=7, kid_subset=3, log=lambda _: None
    )
    by = {(c.step, c.scale): c for c in candidates}
    assert set(by) == {(0, 0.0), (5, 0.0), (5, 1.0), (10, 0.0), (10, 1.0)}
    zero, base = by[(5, 1.0)], by[(0, 0.0)]
    assert zero.drift == 0.0 and by[(10, 0.0)].drift == 0.0  # scale 0 and a zero adapter leave the base images
    assert zero.fid == base.fid and by[(10, 0.0)].fid == base.fid
    assert by[(10, 1.0)].drift > 0
    best = mark_choice(candidates, "fid")
    assert best is by[(10, 1.0)] and best.fid < by[(10, 0.0)].fid
    assert best.pareto and base.pareto  # the best quality, and the least drift
    assert "*p" in table(candidates).splitlines()[-1]
    with pytest.raises(ValueError, match="max_drift"):
        mark_choice(candidates, "fid", max_drift=-1.0)
    assert mark_choice(candidates, "fid", max_drift=0.0).drift == 0.0  # a drift limit keeps the base images


def test_ranking_with_a_stand_in_renderer(tmp_path):
    """The fast variant of the test above: images are a seed's noise plus the adapter's pattern times the scale, so
    the reference (the pattern at other seeds) is matched by the trained adapter at scale 1 and by nothing at 0."""
    pattern = np.random.default_rng(5).integers(0, 120, (32, 32, 3))
    adapters = {"zero": 0, "trained": 1}

    def render(path, scale, prompts, seed):
        noise = [np.random.default_rng(seed + k).integers(0, 100, (32, 32, 3)) for k in range(len(prompts))]
        strength = 0 if path is None else adapters[path] * scale
        return np.stack([n + strength * pattern for n in noise]).astype(np.uint8)

    reference = pooled(render("trained", 1.0, PROMPTS * 2, 1000))
    candidates = score_candidates(
        [(5, "zero"), (10, "trained")],
        [0.0, 1.0],
        render,
        pooled,
        PROMPTS,
        PRIOR,
        reference,
        kid_subset=3,
        log=lambda _: None,
    )
    by = {(c.step, c.scale): c for c in candidates}
    assert by[(5, 1.0)].drift == 0.0 and by[(10, 0.0)].drift == 0.0 and by[(10, 1.0)].drift > 0
    assert mark_choice(candidates, "fid") is by[(10, 1.0)]
    assert mark_choice(candidates, "kid") is by[(10, 1.0)]


def test_rule_pareto_and_report(tmp_path):
    cands = [
        Candidate("base", None, 0, 0.0, fid=50.0, kid=0.05, clip=20.0, drift=0.0),
        Candidate("a", "a", 10, 1.0, fid=30.0, kid=0.03, clip=25.0, drift=2.0),
        Candidate("b", "b", 20, 1.0, fid=30.0, kid=0.04, clip=24.0, drift=3.0),  # same FID, more drift: dominated
        Candidate("c", "c", 20, 0.5, fid=40.0, kid=0.01, clip=22.0, drift=1.0),
    ]
    assert mark_choice(cands, "fid").label == "a"
    assert [c.pareto for c in cands] == [True, True, False, True]
    assert mark_choice(cands, "kid").label == "c"
    assert mark_choice(cands, "clip").label == "a"
    assert mark_choice(cands, "fid", max_drift=1.5).label == "c"
    out = tmp_path / "selection.json"
    write_report(out, cands, "fid", 1.5, {"n_samples": 2})
    report = json.loads(out.read_text())
    assert report["best"]["label"] == "c" and "drift <= 1.5" in report["rule"]
    assert [p.name for p in tmp_path.iterdir()] == ["selection.json"]  # no temp file left
    with pytest.raises(ValueError, match="no clip"):
        mark_choice([Candidate("x", None, 0, 0.0, fid=1.0, kid=0.0)], "clip")


def test_plot_has_one_line_per_scale(tmp_path):
    from PIL import Image

    from ldm.metrics.selection import plot_selection
    from ldm.train.plot import SERIES

    cands = [Candidate("base", None, 0, 0.0, fid=50.0, kid=0.0)]
    cands += [Candidate("x", "x", s, k, fid=40.0 - s / 10 * k, kid=0.0) for s in (10, 20) for k in (0.5, 1.0)]
    plot_selection(tmp_path / "selection.png", cands, "fid")
    colours = {c for _, c in Image.open(tmp_path / "selection.png").convert("RGB").getcolors(1 << 20)}
    assert set(SERIES[:3]) <= colours and SERIES[3] not in colours


def test_run_adapters_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lora-<step>"):
        run_adapters([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no such adapter"):
        run_adapters([str(tmp_path / "nope.safetensors")])
