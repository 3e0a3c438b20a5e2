"""Loading a checkpoint into a model built with uninitialised parameters (the memory-lean load path of the CLIs).

The full-size peak this avoids (random weights and the read file resident together) is measured by
``tests/test_full_size_memory.py``; here the tiny SD2 config shows the mechanics: nothing holds data before the load,
everything holds exactly the file's values after it, and bad files fail exactly as they do for an eagerly built model.
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import mindspore as ms
import numpy as np
import pytest

from ldm.io.checkpoint import CheckpointError, read_state_dict, write_state_dict
from ldm.io.loading import cell_state_dict, load_state_dict_into
from ldm.io.model_io import load_pretrained, read_pretrained, save_model
from ldm.models.diffusion import build_model_from_config
from ldm.models.layers import GroupNorm, uninitialised_names, uninitialised_parameters
from ldm.util import load_config

CONFIG = load_config("ldm/configs/tiny/sd2-tiny.yaml")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny SD2 checkpoint with random values (float32) and its float16 copy."""
    folder = tmp_path_factory.mktemp("weights")
    model = build_model_from_config(CONFIG)
    save_model(model, folder / "fp32.safetensors", config=CONFIG)
    save_model(model, folder / "fp16.safetensors", config=CONFIG, dtype="float16")
    return folder


def test_uninitialised_build_holds_no_parameter_data():
    model = build_model_from_config(CONFIG, uninitialised=True)
    names = list(model.parameters_dict())
    assert len(names) > 400 and uninitialised_names(model) == names
    assert uninitialised_names(build_model_from_config(CONFIG)) == []


@pytest.mark.parametrize("stored", ["fp32", "fp16"])
def test_load_fills_every_parameter_with_the_file_values(weights, stored):
    """Every parameter is set, float32, bit-equal to the stored array cast to float32, and equal to what loading
    into an eagerly built model gives."""
    path = weights / f"{stored}.safetensors"
    lazy = build_model_from_config(CONFIG, uninitialised=True)
    report = load_pretrained(lazy, path)
    assert report.ok and uninitialised_names(lazy) == []
    eager = build_model_from_config(CONFIG)
    load_pretrained(eager, path)
    stored_arrays, got, want = read_state_dict(path), cell_state_dict(lazy), cell_state_dict(eager)
    assert got.keys() == stored_arrays.keys() == want.keys()
    for key, value in stored_arrays.items():
        assert got[key].dtype == np.float32, key
        assert got[key].tobytes() == value.astype(np.float32).tobytes(), key
        assert got[key].tobytes() == want[key].tobytes(), key


def test_loaded_uninitialised_model_runs_like_the_eager_one(weights):
    path = weights / "fp32.safetensors"
    outputs = []
    for uninitialised in (True, False):
        model = build_model_from_config(CONFIG, uninitialised=uninitialised)
        load_pretrained(model, path)
        x = ms.Tensor(np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32))
        t = ms.Tensor(np.array([500], dtype=np.int32))
        context = ms.Tensor(np.random.default_rng(2).standard_normal((1, 77, model.context_dim)).astype(np.float32))
        outputs.append(model.apply_model(x, t, context).asnumpy())
    assert np.array_equal(outputs[0], outputs[1])


def test_missing_and_misshaped_keys_fail_as_for_an_eager_model(weights, tmp_path):
    state = read_state_dict(weights / "fp32.safetensors")
    dropped = "model.diffusion_model.out.2.weight"
    del state[dropped]
    state["first_stage_model.quant_conv.bias"] = np.zeros((3,), np.float32)
    bad = tmp_path / "bad.safetensors"
    write_state_dict(bad, state)
    messages = []
    for uninitialised in (True, False):
        with pytest.raises(CheckpointError) as error:
            load_pretrained(build_model_from_config(CONFIG, uninitialised=uninitialised), bad)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{bad}: state dict does not match the model")
    assert (
        f"1 missing ({dropped})" in messages[0] and "first_stage_model.quant_conv.bias: checkpoint (3,)" in messages[0]
    )
    with pytest.raises(CheckpointError, match=rf"1 missing \({dropped}\)"):
        read_pretrained(build_model_from_config(CONFIG, uninitialised=True), bad)


def test_read_pretrained_gives_what_load_pretrained_sets(weights):
    """The conversion path (check, no assignment) yields the arrays loading would put into the model."""
    path = weights / "fp16.safetensors"
    lazy = build_model_from_config(CONFIG, uninitialised=True)
    state = read_pretrained(lazy, path)
    assert uninitialised_names(lazy) == list(lazy.parameters_dict())  # only checked against, never filled
    assert list(state) == list(lazy.parameters_dict())
    load_pretrained(lazy, path)
    for key, value in cell_state_dict(lazy).items():
        assert state[key].dtype == value.dtype and state[key].tobytes() == value.tobytes(), key


def test_consume_releases_arrays_and_allowed_missing_are_initialised(rng):
    """``consume`` empties the caller's dict as it assigns; a parameter the file may lack gets its initializer's
    value rather than staying without data."""
    with uninitialised_parameters():
        norm = GroupNorm(2, 4)
    state = {"weight": rng.standard_normal(4).astype(np.float32)}
    kept = dict(state)
    report = load_state_dict_into(norm, state, allow_missing=("bias",), consume=True)
    assert report.allowed_missing == ["bias"] and state == {}
    assert uninitialised_names(norm) == []
    assert np.array_equal(norm.weight.asnumpy(), kept["weight"])
    assert np.array_equal(norm.bias.asnumpy(), np.zeros(4, np.float32))
    again = dict(kept)
    load_state_dict_into(norm, again, allow_missing=("bias",))
    assert again.keys() == kept.keys()
