"""The memory plan (ldm.memory_plan): its parameter counts equal the built networks', its weights and optimizer
terms are the hand-computed sums, it picks the fastest plan when memory is ample and a lean one under a small
``--max_memory_gib``, a switch the user set is kept, both plans train the tiny model to the same losses, the choice
is one log line, and a bad ``--max_memory_gib`` is one clear error."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm import memory_plan as mp
from ldm.data.synthetic import make_shapes_dataset
from ldm.generate_options import parse_options as parse_generate_options
from ldm.train.options import TrainOptions, parse_options
from ldm.util import CONFIG_DIR, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = CONFIG_DIR / "tiny/sd2-tiny.yaml"
TINY_SD = CONFIG_DIR / "tiny_sd/tiny-sd.yaml"
FAST = mp.Plan(mode=0, use_recompute=False, memory_efficient_attention=False, attention_slice_size=0)
SWITCHES = ("mode", "use_recompute", "memory_efficient_attention", "attention_slice_size")


@pytest.mark.parametrize("name", ["tiny/sd2-tiny.yaml", "tiny/sd1-tiny.yaml", "tiny_sd/tiny-sd.yaml"])
def test_parameter_counts_equal_the_built_networks(name):
    from ldm.lora.network import inject_lora, lora_parameters
    from ldm.lora.targets import TEXT_ENCODER_TARGETS, UNET_TARGET_PRESETS
    from ldm.models.diffusion import build_model_from_config

    config = load_config(CONFIG_DIR / name)
    model = build_model_from_config(config, uninitialised=True)
    vae = model.first_stage_model

    def count(*cells):
        return sum(p.size for cell in cells for p in cell.get_parameters())

    assert mp.unet_param_count(config) == count(model.model)
    assert mp.vae_param_counts(config) == (count(vae.encoder, vae.quant_conv), count(vae.decoder, vae.post_quant_conv))
    assert mp.text_encoder_param_count(config) == count(model.cond_stage_model)
    for targets in ("attention", "extended"):
        lora = build_model_from_config(config)
        inject_lora(lora.model, targets=UNET_TARGET_PRESETS[targets], rank=3)
        inject_lora(lora.cond_stage_model, targets=TEXT_ENCODER_TARGETS, rank=3)
        assert mp.lora_param_count(config, 3, targets, text_encoder=True) == sum(p.size for p in lora_parameters(lora))


def test_counts_and_terms_by_hand():
    # ResBlock 2 -> 4 channels, time embedding 8: GroupNorm 2*2, conv 9*2*4+4, emb Linear 8*4+4, GroupNorm 2*4,
    # conv 9*4*4+4, 1x1 skip 2*4+4
    assert mp._resblock_params(2, 4, 8) == 4 + 76 + 36 + 8 + 148 + 12
    # text encoder: width 8, 1 layer, vocab 10, 4 positions: embeddings 80 + 32; layer: 2 LayerNorms 32, q/k/v/out
    # 4*(64+8), MLP 8*32+32 + 32*8+8; final LayerNorm 16
    config = {"model": {"params": {"cond_stage_config": {"params": {"width": 8, "layers": 1, "vocab_size": 10}}}}}
    config["model"]["params"]["cond_stage_config"]["params"]["max_length"] = 4
    assert mp.text_encoder_param_count(config) == 80 + 32 + 32 + 4 * 72 + 288 + 264 + 16
    tiny = load_config(TINY)
    unet, (enc, dec), text = mp.unet_param_count(tiny), mp.vae_param_counts(tiny), mp.text_encoder_param_count(tiny)
    full = mp.TrainJob(batch=1, height=32, width=32, use_lora=False, use_ema=True)
    terms = mp.estimate_training(tiny, full, FAST).terms
    assert terms["weights"] == 4 * (unet + enc + dec + text)  # everything fp32, nothing cached
    assert terms["optimizer"] == 4 * unet * 4  # gradient, two AdamW moments, EMA copy, fp32 each
    lora = mp.TrainJob(batch=1, height=32, width=32, precision="fp16", lora_rank=2, cache_latents=True)
    terms = mp.estimate_training(tiny, lora, FAST).terms
    assert terms["weights"] == 2 * unet + 4 * (dec + text)  # frozen UNet stored fp16, VAE encoder released
    assert terms["optimizer"] == 4 * 4 * mp.lora_param_count(tiny, 2)  # fp32 LoRA weight, gradient, two moments


def test_fast_plan_when_ample_lean_when_small():
    config, job = load_config(TINY_SD), mp.TrainJob(batch=4, height=64, width=64)
    ample = mp.plan_training(config, job, {}, 64 * mp.GIB, "test")
    assert ample.fits and ample.chosen.plan == FAST
    leanest = min(mp.estimate_training(config, job, p).peak for p in _all_training_plans())
    small = mp.plan_training(config, job, {}, leanest, "test")
    assert small.fits and small.chosen.peak == leanest and small.chosen.plan.cost > FAST.cost
    assert small.chosen.plan.use_recompute or small.chosen.plan.mode == 1
    none = mp.plan_training(config, job, {}, leanest - 1, "test")
    assert not none.fits and none.chosen.peak == leanest and "no plan fits" in none.log_line()
    given = mp.plan_training(config, job, {"mode": 0, "use_recompute": False}, leanest, "test")
    assert (given.chosen.plan.mode, given.chosen.plan.use_recompute) == (0, False)
    # full size on a CPU: graph mode holds every intermediate, so SD2-base 512px trains op by op
    sd2 = mp.plan_training(load_config(CONFIG_DIR / "v2-inference.yaml"), mp.TrainJob(1, 512, 512), {}, 64 * mp.GIB, "")
    assert sd2.chosen.plan.mode == 1 and not sd2.chosen.plan.use_recompute


def _all_training_plans():
    switches = {"mode": [0, 1], "use_recompute": [False, True], "memory_efficient_attention": [False, True]}
    return mp._candidates({}, {**switches, "attention_slice_size": [0]})


def test_available_memory_sources(tmp_path):
    assert mp.available_memory("CPU", 2.5) == (int(2.5 * mp.GIB), "--max_memory_gib")
    size, source = mp.available_memory("CPU")
    assert size > 0 and source
    (tmp_path / "memory.max").write_text("4294967296\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert mp._cgroup_room(tmp_path) == 3 * mp.GIB
    (tmp_path / "memory.max").write_text("max\n")  # v2 without a limit
    assert mp._cgroup_room(tmp_path) is None
    for bad in (0, -1.0, float("nan"), float("inf"), "8"):
        with pytest.raises(ConfigError, match="max_memory_gib must be a positive number"):
            mp.available_memory("CPU", bad)


def test_options_leave_switches_unset_and_keep_given_ones(tmp_path):
    opts = parse_options([])
    assert [getattr(opts, name) for name in SWITCHES] == [None] * 4 and opts.max_memory_gib is None
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("use_recompute: true\nmax_memory_gib: 12\n")
    opts = parse_options(["--train_config", str(recipe), "--mode", "1", "--attention_slice_size", "2"])
    assert (opts.mode, opts.use_recompute, opts.memory_efficient_attention, opts.attention_slice_size) == (
        1,
        True,
        None,
        2,
    )
    decision = mp.plan_training(
        load_config(TINY), mp.TrainJob(2, 32, 32), {n: getattr(opts, n) for n in SWITCHES}, 1, ""
    )
    planned = mp.apply_plan(opts, decision)
    assert (planned.mode, planned.use_recompute, planned.attention_slice_size) == (1, True, 2)
    assert planned.memory_efficient_attention is not None
    gen = parse_generate_options(["--prompt", "x", "--vae_slicing", "True"])
    assert (gen.mode, gen.attention_slice_size, gen.vae_slicing) == (None, None, True)
    with pytest.raises(ConfigError, match="max_memory_gib must be a positive number"):
        parse_options(["--max_memory_gib", "-3"])


@pytest.mark.parametrize(
    "argv",
    [
        ["examples/stable_diffusion_v2/train_text_to_image.py", "--max_memory_gib", "0"],
        ["examples/stable_diffusion_v2/text_to_image.py", "--prompt", "x", "--max_memory_gib", "nan"],
        ["examples/stable_diffusion_v2/text_to_image.py", "--prompt", "x", "--max_memory_gib", "lots"],
    ],
)
def test_bad_max_memory_gib_is_one_error(argv):
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "max_memory_gib" in errors[0], proc.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.tiny_base import save_tiny_base

    root = tmp_path_factory.mktemp("memory_plan")
    return {"root": root, "base": save_tiny_base(root), "data": make_shapes_dataset(root / "data", count=4, size=32)}


def _train(tiny_run, out: str, **extra):
    from ldm.train.trainer import finish_run, set_up_run, train_loop

    opts = TrainOptions(
        data_path=str(tiny_run["data"]),
        output_path=str(tiny_run["root"] / out),
        pretrained_model_path=str(tiny_run["base"]),
        image_size=32,
        train_batch_size=2,
        max_train_steps=2,
        start_learning_rate=1e-2,
        lora_rank=2,
        seed=7,
        **extra,
    )
    run = set_up_run(opts, load_config(TINY))
    summary = finish_run(run, train_loop(run))
    losses = [json.loads(line)["loss"] for line in Path(summary["metrics"]).read_text().splitlines()]
    return run.opts, losses


def test_both_plans_train_to_the_same_losses(tiny_run, caplog):
    """The tiny model's two steps under the fast plan and under the leanest (``--max_memory_gib`` at the leanest
    estimate), both with ``mode 1`` given (it stays: a given option wins; op by op keeps the test to seconds, where
    compiling the graph takes minutes on a loaded machine). The lean plan recomputes the blocks and slices the
    attention with a recomputing backward: the same arithmetic, so the losses agree to 1e-6 relative (float
    rounding of the sliced attention)."""
    from ldm.train.trainer import plan_memory

    probe = plan_memory(TrainOptions(image_size=32, train_batch_size=2, lora_rank=2), load_config(TINY))
    assert [getattr(probe, name) for name in SWITCHES] == [0, False, False, 0]  # ample memory: graph, nothing saved
    job = mp.TrainJob(batch=2, height=32, width=32, lora_rank=2)
    leanest = min(mp.estimate_training(load_config(TINY), job, p).peak for p in _all_training_plans())
    with caplog.at_level(logging.INFO, logger="ldm.train"):
        fast, fast_losses = _train(tiny_run, "fast", mode=1)
        lean, lean_losses = _train(tiny_run, "lean", mode=1, max_memory_gib=(leanest + 1024) / mp.GIB)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan: ")]
    assert len(lines) == 2 and "est. peak" in lines[0] and "op by op, recompute off" in lines[0], lines
    assert [getattr(fast, name) for name in SWITCHES] == [1, False, True, 0]  # as fast and leaner than plain attention
    assert lean.mode == 1 and lean.use_recompute and "op by op, recompute on" in lines[1]
    np.testing.assert_allclose(lean_losses, fast_losses, rtol=1e-6)


def test_generation_plan(tiny_run):
    from ldm.generate import plan_memory

    job = parse_generate_options(["--prompt", "x", "--config", str(TINY_SD)])
    lines = []
    planned = plan_memory(job, log=lines.append)
    assert (planned.mode, planned.attention_slice_size, planned.vae_slicing) == (0, 0, False)
    assert len(lines) == 1 and lines[0].startswith("memory plan: graph, attention slice 0, VAE slicing off - est.")
    assert plan_memory(planned, log=lines.append) is planned and len(lines) == 1  # nothing left to plan
    small = plan_memory(dataclasses.replace(job, n_samples=4, max_memory_gib=0.5), log=lines.append, warn=lines.append)
    assert small.mode == 1 and small.attention_slice_size == 1 and small.vae_slicing
