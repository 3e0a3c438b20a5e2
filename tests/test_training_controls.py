"""Training controls: ``checkpoints_total_limit`` keeps the newest N weight files and the one the train state needs,
``init_lora_weights`` starts from an adapter in our, diffusers or kohya format (the first step's loss is the loaded
adapter's), and ``text_encoder_lr`` gives the text encoder's parameters their own learning rate."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from ldm.env import set_seed
from ldm.io.checkpoint import write_state_dict
from ldm.lora.adapter import write_adapter
from ldm.lora.interop import UNetLayout, to_diffusers, to_kohya
from ldm.lora.network import lora_layers, lora_modules, to_adapter
from ldm.names import TEXT_PREFIX
from ldm.train.losses import NoiseSampler
from ldm.train.options import TrainOptions, check_training_controls
from ldm.train.retention import prune_weights
from ldm.train.state import read_train_state_meta
from ldm.train.step import TrainStep
from ldm.train.trainer import LDMTrainLoss, _checkpoint, build_trainable_model, param_lr_scales
from ldm.util import CONFIG_DIR, ConfigError, load_config

CONFIG = CONFIG_DIR / "tiny/sd2-tiny.yaml"


@pytest.fixture
def pynative():
    """Op by op: the loss is compared on several freshly built models, and compiling each would take minutes."""
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=mode)


def _touch(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"x")


def test_prune_keeps_the_newest_and_the_needed_file(tmp_path):
    _touch(tmp_path, *(f"lora-{s:06d}.safetensors" for s in (5, 10, 15, 20)), "train_state.safetensors", "notes.txt")
    deleted = prune_weights(tmp_path, 2, keep="lora-000005.safetensors")
    assert sorted(p.name for p in deleted) == ["lora-000010.safetensors"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "lora-000005.safetensors",
        "lora-000015.safetensors",
        "lora-000020.safetensors",
        "notes.txt",
        "train_state.safetensors",
    ]
    _touch(tmp_path, "lora-1000000.safetensors")  # a step past six digits sorts by number, not by name
    prune_weights(tmp_path, 1, keep=None)
    assert sorted(p.name for p in tmp_path.glob("lora-*")) == ["lora-1000000.safetensors"]


def test_trainer_checkpoints_keep_exactly_n(tmp_path):
    """Five checkpoints of a real (tiny) run's state with a limit of 2: exactly the last two remain, and the train
    state names the newest."""
    opts = TrainOptions(lora_rank=2, checkpoints_total_limit=2)
    model, params = build_trainable_model(opts, load_config(CONFIG))
    step = TrainStep(LDMTrainLoss(model, None, 0.0), params, 1e-3)
    for done in range(1, 6):
        _checkpoint(model, params, step, NoiseSampler(0), None, done, tmp_path, opts)
    assert sorted(p.name for p in tmp_path.glob("lora-*")) == ["lora-000004.safetensors", "lora-000005.safetensors"]
    state = read_train_state_meta(str(tmp_path / "train_state.safetensors"))
    assert state["extra"]["weights"] == "lora-000005.safetensors"


def _built(opts):
    """The tiny model with LoRA; the same seed gives every build the same (random) base weights."""
    set_seed(0)
    return build_trainable_model(opts, load_config(CONFIG))[0]


def _trained_like(rng, opts):
    """A model whose LoRA weights and alphas are random (as after training), and its adapter."""
    model = _built(opts)
    for i, (_, layer) in enumerate(lora_layers(model)):
        for p in layer.lora_parameters():
            p.set_data(ms.Tensor(rng.normal(0, 0.2, p.shape).astype(np.float32)))
        layer.set_alpha(1.0 + i % 3)
    return model, to_adapter(model, "sd2", context_dim=32, parameterization="eps")


def _loss(model, rng_seed=0):
    """The training loss of one fixed batch (what the first step reports before it updates anything)."""
    rng = np.random.default_rng(rng_seed)
    x0 = ms.Tensor(rng.standard_normal((2, 4, 4, 4), dtype=np.float32))
    ids = ms.Tensor(model.tokenize(["a red circle", "a blue square"]))
    t = ms.Tensor(np.array([100, 800], np.int32))
    noise = ms.Tensor(rng.standard_normal((2, 4, 4, 4), dtype=np.float32))
    return float(LDMTrainLoss(model, None, 0.0, encode_text=True)(x0, ids, t, noise, noise[:, :, :1, :1]).asnumpy())


@pytest.fixture(scope="module")
def trained():
    """One 'trained' model (random LoRA weights and alphas), its adapter, its loss and the loss of a fresh LoRA."""
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)  # see pynative()
    recipe = dict(lora_rank=2, lora_ft_text_encoder=True)
    model, adapter = _trained_like(np.random.default_rng(1), TrainOptions(**recipe))
    yield {
        "recipe": recipe,
        "modules": lora_modules(model),
        "adapter": adapter,
        "loss": _loss(model),
        "fresh_loss": _loss(_built(TrainOptions(**recipe))),
    }
    ms.set_context(mode=mode)


@pytest.mark.parametrize("fmt", ["ours", "diffusers", "kohya"])
def test_init_lora_weights_starts_from_the_adapter(fmt, trained, tmp_path):
    adapter, recipe = trained["adapter"], trained["recipe"]
    layout = UNetLayout.from_config(load_config(CONFIG))
    path = tmp_path / f"{fmt}.safetensors"
    if fmt == "ours":
        write_adapter(path, adapter)
    else:
        write_state_dict(path, *(to_kohya(adapter, layout) if fmt == "kohya" else to_diffusers(adapter, layout)))
    started = _built(TrainOptions(**recipe, init_lora_weights=str(path)))
    want, got = trained["modules"], lora_modules(started)
    assert want.keys() == got.keys()
    for name, (down, up, alpha) in want.items():
        np.testing.assert_array_equal(got[name][0], down, err_msg=name)
        np.testing.assert_array_equal(got[name][1], up, err_msg=name)
        assert got[name][2] == alpha, name
    assert _loss(started) == trained["loss"] != trained["fresh_loss"]


def test_init_lora_weights_mismatch_is_named(tmp_path, pynative):
    _, adapter = _trained_like(np.random.default_rng(2), TrainOptions(lora_rank=2))
    path = tmp_path / "rank2.safetensors"
    write_adapter(path, adapter)
    with pytest.raises(ValueError, match=r"init_lora_weights .*rank2.safetensors \(ldm\).*different rank"):
        build_trainable_model(TrainOptions(lora_rank=4, init_lora_weights=str(path)), load_config(CONFIG))
    with pytest.raises(ValueError, match="missing"):  # the run also trains a text-encoder LoRA the file lacks
        build_trainable_model(
            TrainOptions(lora_rank=2, lora_ft_text_encoder=True, init_lora_weights=str(path)), load_config(CONFIG)
        )


def test_control_conflicts_are_named():
    with pytest.raises(ConfigError, match="'text_encoder_lr' needs 'lora_ft_text_encoder'"):
        check_training_controls(TrainOptions(text_encoder_lr=1e-5))
    with pytest.raises(ConfigError, match="give one"):
        check_training_controls(TrainOptions(init_lora_weights="a.safetensors", resume="True"))
    with pytest.raises(ConfigError, match="needs 'use_lora'"):
        check_training_controls(TrainOptions(init_lora_weights="a.safetensors", use_lora=False))


def test_text_encoder_lr_reaches_the_text_encoder_parameters():
    opts = TrainOptions(lora_rank=2, lora_ft_text_encoder=True, start_learning_rate=1e-4, text_encoder_lr=2.5e-5)
    _, params = build_trainable_model(opts, load_config(CONFIG))
    scales = param_lr_scales(params, opts)
    te = [s for p, s in zip(params, scales) if p.name.startswith(TEXT_PREFIX)]
    unet = [s for p, s in zip(params, scales) if not p.name.startswith(TEXT_PREFIX)]
    assert te and unet and set(te) == {0.25} and set(unet) == {1.0}
    assert param_lr_scales(params, TrainOptions(lora_ft_text_encoder=True)) is None


class _TwoGroups(nn.Cell):
    def __init__(self):
        super().__init__()
        self.a = ms.Parameter(ms.Tensor(np.ones(3, np.float32)), name="unet.w")
        self.b = ms.Parameter(ms.Tensor(np.ones(3, np.float32)), name="cond_stage_model.w")

    def construct(self, x):
        return (self.a * x).sum() + (self.b * x).sum()


def test_parameter_groups_step_with_their_own_rate():
    """AdamW's first update moves each weight by lr * factor (m / sqrt(v) = sign(g) at step 1; no decay). Tolerance:
    half a float32 spacing at 1.0 (6e-8), the rounding of the updated weight itself."""
    net = _TwoGroups()
    step = TrainStep(net, [net.a, net.b], 1e-2, weight_decay=0.0, max_grad_norm=None, lr_scales=[1.0, 0.25])
    step(ms.Tensor(np.array([1.0, -2.0, 3.0], np.float32)))
    np.testing.assert_allclose(1.0 - net.a.asnumpy(), [1e-2, -1e-2, 1e-2], rtol=0, atol=6e-8)
    np.testing.assert_allclose(1.0 - net.b.asnumpy(), [2.5e-3, -2.5e-3, 2.5e-3], rtol=0, atol=6e-8)
