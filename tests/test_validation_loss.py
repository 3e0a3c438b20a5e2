"""Held-out validation loss: the split never trains, the loss is deterministic and leaves the training run unchanged
bit for bit, it is logged, plotted and resumed; LoRA dropout is on in training and off while validating."""

from __future__ import annotations

import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from ldm.data.dataset import ImageCaptionSource, split_records
from ldm.data.records import read_index
from ldm.data.synthetic import make_shapes_dataset
from ldm.io.checkpoint import read_state_dict
from ldm.lora.network import lora_layers
from ldm.models.diffusion import build_model_from_config
from ldm.train.options import TrainOptions, check_validation_options, parse_options, resolve_train_config
from ldm.train.trainer import finish_run, set_up_run, train_loop, validation_loss
from ldm.train.validation import check_timesteps, evaluating, set_training, spread_timesteps
from ldm.util import CONFIG_DIR, ConfigError, load_config
from tests.tiny_base import save_tiny_base

CONFIG = CONFIG_DIR / "tiny/sd2-tiny.yaml"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("val_loss")
    base = save_tiny_base(root)
    data = make_shapes_dataset(root / "data", count=8, size=32)
    held = make_shapes_dataset(root / "held", count=3, size=32, seed=5)
    return {"root": root, "base": base, "data": data, "held": held, "config": load_config(CONFIG)}


def options(setup, out: str, **extra) -> TrainOptions:
    recipe = dict(data_path=str(setup["data"]), output_path=str(setup["root"] / out))
    recipe.update(pretrained_model_path=str(setup["base"]), image_size=32, train_batch_size=2, seed=7)
    recipe.update(max_train_steps=4, start_learning_rate=1e-2, lora_rank=2, ckpt_save_interval=0)
    return TrainOptions(**{**recipe, **extra})


def test_split_is_disjoint_seeded_and_left_out_of_training(setup):
    records = read_index(setup["data"])[1]
    train, held = split_records(records, 0.25, seed=3)
    assert len(held) == 2 and len(train) == 6 and not {r.path for r in train} & {r.path for r in held}
    assert split_records(records, 0.25, seed=3) == (train, held)
    assert split_records(records, 0.25, seed=4)[1] != held
    source = ImageCaptionSource(setup["data"], image_size=32, seed=3, validation_split=0.25)
    assert source.records == train
    with pytest.raises(ValueError, match="none are left"):
        split_records(records[:1], 0.5, seed=0)
    repeated = records * 3  # a kohya N_name folder lists an image N times: all its copies are held out together
    train, held = split_records(repeated, 0.25, seed=3)
    assert len(held) == 2 and len(train) == 18 and not {r.path for r in train} & {r.path for r in held}


def test_option_conflicts_are_named():
    with pytest.raises(ConfigError, match="not both"):
        check_validation_options(TrainOptions(validation_data_path="x", validation_split=0.1))
    with pytest.raises(ConfigError, match="'validation_loss_steps' needs"):
        check_validation_options(TrainOptions(validation_loss_steps=5))
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        check_validation_options(TrainOptions(validation_split=1.0))
    opts = parse_options(["--validation_split", "0.1", "--validation_loss_timesteps", "10", "990"])
    assert opts.validation_split == 0.1 and opts.validation_loss_timesteps == [10, 990]


def test_timesteps_spread_and_checked():
    assert spread_timesteps(1000) == [100, 300, 500, 700, 900]
    assert check_timesteps([], 1000) == [100, 300, 500, 700, 900]
    with pytest.raises(ValueError, match=r"\[1000\] are outside"):
        check_timesteps([5, 1000], 1000)


def run_steps(opts: TrainOptions):
    config = resolve_train_config(opts).config if opts.model_config else load_config(CONFIG)
    run = set_up_run(opts, config)
    return run, finish_run(run, train_loop(run))


@pytest.mark.slow
def test_validation_changes_nothing_and_is_logged(setup):
    """Four steps with and without a validation set (measured every 2 steps): the training losses and the adapter
    are equal bit for bit; val_loss is logged before training, at steps 2 and 4, and drawn; evaluating the same
    weights twice gives the same number."""
    _, off = run_steps(options(setup, "off"))
    run, on = run_steps(options(setup, "on", validation_data_path=str(setup["held"]), validation_loss_steps=2))
    rows = [json.loads(line) for line in Path(on["metrics"]).read_text().splitlines()]
    plain = [json.loads(line) for line in Path(off["metrics"]).read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in plain]
    want, got = read_state_dict(off["weights"]), read_state_dict(on["weights"])
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4]
    assert rows[0] == {"step": 0, "val_loss": rows[0]["val_loss"]} and "val_loss" not in rows[1]
    assert len(run.validation) == 3 * 5
    last = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    assert validation_loss(run) == last == validation_loss(run)
    assert Path(on["loss_plot"]).is_file()


def test_validation_is_deterministic_and_touches_no_training_state(setup):
    """The library-level check behind the slow on/off run: evaluating the validation loss twice gives the same
    number and leaves the noise stream, numpy's global generator, the weights and the optimizer state as they were.
    LoRA dropout is active in the trainer's networks (train mode) and off while validating."""
    opts = options(setup, "dropout", lora_dropout=0.5, validation_split=0.25)
    run = set_up_run(opts, setup["config"])
    assert len(run.validation) == 2 * 5  # 25 % of the 8 images, 5 timesteps each
    layers = [layer for _, layer in lora_layers(run.model.model)]
    assert layers and all(layer.dropout.training for layer in layers)
    for layer in layers:  # a nonzero branch, so that dropout shows in the output and the loss
        layer.lora_up.weight.set_data(ms.Tensor(np.full(layer.lora_up.weight.shape, 0.5, np.float32)))
    noise, global_rng, state = run.noise.get_state(), np.random.get_state(), run.step.state_arrays()
    first = validation_loss(run)
    assert np.isfinite(first) and validation_loss(run) == first
    assert run.noise.get_state() == noise and all(layer.dropout.training for layer in layers)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:], global_rng[1:]))
    after = run.step.state_arrays()
    assert all(np.array_equal(after[k], v) for k, v in state.items())


def test_set_training_covers_the_text_encoder_when_it_trains():
    model = build_model_from_config(load_config(CONFIG))
    set_training(model, train_text_encoder=True)
    assert model.model.training and model.cond_stage_model.training and not model.first_stage_model.training
    with evaluating(model, True):
        assert not model.model.training and not model.cond_stage_model.training
    assert model.model.training


def test_plot_draws_the_validation_curve(tmp_path):
    """A metrics file with the step-0 validation line and val_loss on some step lines draws the held-out curve."""
    from PIL import Image

    from ldm.train.plot import VAL, plot_metrics

    rows = [{"step": 0, "val_loss": 0.9}]
    rows += [
        {"step": s, "loss": 1.0 / s, "lr": 1e-3, **({"val_loss": 0.9 - s / 100} if s % 10 == 0 else {})}
        for s in range(1, 31)
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_metrics(metrics, tmp_path / "loss.png")
    colours = {c for _, c in Image.open(tmp_path / "loss.png").convert("RGB").getcolors(1 << 20)}
    assert VAL in colours
    rows = [r for r in rows if "loss" in r and "val_loss" not in r]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_metrics(metrics, tmp_path / "plain.png")
    assert VAL not in {c for _, c in Image.open(tmp_path / "plain.png").convert("RGB").getcolors(1 << 20)}


@pytest.mark.slow
def test_validation_loss_falls_on_the_demo_recipe(tmp_path):
    """Four steps of make demo's recipe on the shipped tiny SD with 10% held out: the held-out loss measured before
    training, at step 2 and at step 4 falls each time (measured: 0.1180, 0.1176, 0.1156)."""
    model = ROOT / "models/tiny_sd"
    opts = parse_options(
        ["--train_config", str(ROOT / "configs/train/train_config_lora_tiny_sd_blueprint.yaml")]
        + ["--data_path", str(model / "data/blueprint_train"), "--output_path", str(tmp_path / "out")]
        + ["--pretrained_model_path", str(model / "tiny_sd.safetensors"), "--max_train_steps", "4"]
        + ["--validation_split", "0.1", "--validation_loss_steps", "2", "--validation_steps", "0"]
    )
    _, summary = run_steps(opts)
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], losses
