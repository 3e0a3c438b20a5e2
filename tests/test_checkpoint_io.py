"""Checkpoint files (safetensors, MindSpore .ckpt, torch zip/TorchScript via the safe unpickler) and strict loading."""

import collections
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from mindspore import nn

import ldm  # noqa: F401  (must precede mindspore)
from ldm.io.checkpoint import CheckpointError, read_metadata, read_state_dict, write_state_dict
from ldm.io.loading import cell_state_dict, check_state_dict, load_state_dict_into
from ldm.io.torch_pickle import UnsafePickleError, load_torch_file
from ldm.models.layers import GroupNorm, Linear


def _sample(rng):
    return {
        "a.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "a.half": rng.standard_normal((5,)).astype(np.float16),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "count": np.array(7, dtype=np.int32),
    }


def _assert_bitwise(got, want):
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip_is_bitwise(tmp_path, rng, suffix):
    state = _sample(rng)
    state["a.weight"][0, 0] = np.nan
    path = tmp_path / f"model{suffix}"
    write_state_dict(path, state, metadata={"rank": "4"} if suffix == ".safetensors" else None)
    _assert_bitwise(read_state_dict(path, check_finite=False), state)  # NaN bits survive; loading refuses NaN
    assert read_metadata(path) == ({"rank": "4"} if suffix == ".safetensors" else {})
    assert sorted(os.listdir(tmp_path)) == [path.name]


@pytest.mark.parametrize(
    "suffix,writer", [(".safetensors", "safetensors.numpy.save_file"), (".ckpt", "mindspore.save_checkpoint")]
)
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, rng, monkeypatch, suffix, writer):
    path = tmp_path / f"model{suffix}"
    old = _sample(rng)
    write_state_dict(path, old)

    def half_write(_state, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(writer, half_write)
    with pytest.raises(OSError, match="disk full"):
        write_state_dict(path, {"other": np.zeros(2, np.float32)})
    assert sorted(os.listdir(tmp_path)) == [path.name]
    _assert_bitwise(read_state_dict(path), old)


@pytest.mark.parametrize("cut", [4, 30, -10])
def test_truncated_safetensors_names_file(tmp_path, rng, cut):
    path = tmp_path / "lora.safetensors"
    write_state_dict(path, _sample(rng))
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"lora\.safetensors: .*truncated"):
        read_state_dict(path)


def test_corrupt_safetensors_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10).to_bytes(8, "little") + b"not json!!")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: corrupt safetensors header"):
        read_state_dict(path)


def test_safetensors_bfloat16_widened(tmp_path):
    from safetensors.torch import save_file

    t = torch.tensor([1.5, -2.25, 3e38], dtype=torch.bfloat16)
    save_file({"w": t}, tmp_path / "bf.safetensors")
    with pytest.warns(UserWarning, match="bfloat16"):
        got = read_state_dict(tmp_path / "bf.safetensors")
    np.testing.assert_array_equal(got["w"], t.float().numpy())


def test_safetensors_every_stored_dtype_read_exactly(tmp_path, rng):
    """The reader takes tensor bytes straight from the file (not through safetensors' memory map, which keeps what
    it touched resident): every dtype the format stores, scalars and empty tensors come back bit for bit."""
    from safetensors.numpy import save_file

    arrays = {
        f"t_{dtype}": (rng.standard_normal((3, 5)) * 40).astype(dtype)
        for dtype in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
    }
    arrays["scalar"] = np.array(2.5, np.float32)
    arrays["empty"] = np.zeros((0, 4), np.float32)
    path = tmp_path / "dtypes.safetensors"
    save_file(arrays, str(path))
    got = read_state_dict(path)
    assert sorted(got) == sorted(arrays)
    for key, value in arrays.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key
        owner = got[key] if got[key].base is None else got[key].base
        assert owner.flags.owndata, key  # numpy owns the memory: no file map or buffer object behind it


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_state_dict(tmp_path / "x.npz")
    with pytest.raises(CheckpointError, match="metadata"):
        write_state_dict(tmp_path / "m.ckpt", {}, metadata={"a": "b"})


def _torch_state():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    inner = collections.OrderedDict(
        f32=torch.randn(2, 3),
        f16=torch.randn(3).half(),
        bf16=torch.tensor([1.0, -0.5, 7.0], dtype=torch.bfloat16),
        i64=torch.arange(4),
        i32=torch.arange(3, dtype=torch.int32),
        u8=torch.arange(5, dtype=torch.uint8),
        flag=torch.tensor([True, False]),
        transposed=base.t(),
        sliced=base[1:3, 2:5],
        param=torch.nn.Parameter(torch.ones(2, 2)),
    )
    return {"state_dict": inner, "global_step": 12, "score": np.float64(0.5)}


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin"])
def test_torch_pickle_refused_without_allow_pickle(tmp_path, name):
    torch.save({"w": torch.ones(2)}, tmp_path / name)
    with pytest.raises(CheckpointError, match=rf"{name}: .*--allow_pickle"):
        read_state_dict(tmp_path / name)


def test_torch_save_read_with_allow_pickle(tmp_path):
    state = _torch_state()
    torch.save(state, tmp_path / "lightning.ckpt")
    with pytest.warns(UserWarning, match="1 bfloat16"):
        got = read_state_dict(tmp_path / "lightning.ckpt", allow_pickle=True)
    want = {k: v.detach().float() if v.dtype == torch.bfloat16 else v.detach() for k, v in state["state_dict"].items()}
    assert list(got) == list(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)
        assert got[key].dtype == value.numpy().dtype, key
        assert got[key].flags.c_contiguous and got[key].flags.writeable, key


def test_truncated_torch_file_names_file(tmp_path):
    torch.save({"w": torch.ones(64)}, tmp_path / "cut.pt")
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: truncated"):
        read_state_dict(tmp_path / "cut.pt", allow_pickle=True)


def test_lightning_callback_key_is_inert(tmp_path, monkeypatch):
    """Old Lightning checkpoints key callback states by the callback class; it loads as an inert placeholder."""

    class ModelCheckpoint:
        pass

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": {ModelCheckpoint: {"best": 1}}}, tmp_path / "a.ckpt")
    assert b"ModelCheckpoint" in zipfile.ZipFile(tmp_path / "a.ckpt").read("a/data.pkl")
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    assert list(load_torch_file(tmp_path / "a.ckpt")) == ["w"]


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)
        self.register_buffer("scale", torch.arange(3, dtype=torch.int32))

    def forward(self, x):
        return self.conv(x)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Block(), _Block()])
        self.head = torch.nn.Linear(2, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive(tmp_path):
    scripted = torch.jit.script(_Net())
    torch.jit.save(scripted, tmp_path / "net.pt")
    got = load_torch_file(tmp_path / "net.pt")
    want = scripted.state_dict()
    assert set(got) == set(want) and "layers.1.conv.weight" in got
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)


class _Evil:
    def __init__(self, marker, func):
        self.marker, self.func = marker, func

    def __reduce__(self):
        if self.func == "system":
            return os.system, (f"touch {self.marker}",)
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("func,global_name", [("system", "posix.system"), ("eval", "__builtin__.eval")])
def test_malicious_pickle_refused_without_running(tmp_path, func, global_name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"w": _Evil(marker, func)}, protocol=2))
    with pytest.raises(UnsafePickleError, match=rf"evil\.pt: refusing to unpickle global '{global_name}'"):
        read_state_dict(path, allow_pickle=True)
    assert not marker.exists()


def test_legacy_pickle_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "old.pth"
    path.write_bytes(pickle.dumps(_Evil(marker, "system"), protocol=2))
    with pytest.raises(CheckpointError, match=r"old\.pth: legacy"):
        read_state_dict(path, allow_pickle=True)
    assert not marker.exists()


class _Small(nn.Cell):
    def __init__(self):
        super().__init__()
        self.proj = Linear(3, 4)
        self.norm = GroupNorm(2, 4)


def _small_state(rng):
    return {
        "proj.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "proj.bias": rng.standard_normal(4).astype(np.float32),
        "norm.weight": rng.standard_normal(4).astype(np.float32),
        "norm.bias": rng.standard_normal(4).astype(np.float64),  # cast to the param's float32
    }


def test_load_state_dict_into_sets_values(rng):
    cell = _Small()
    state = _small_state(rng)
    report = load_state_dict_into(cell, state, source="x.safetensors")
    assert report.ok and sorted(report.loaded) == sorted(state)
    got = cell_state_dict(cell)
    for key, value in state.items():
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], value.astype(np.float32))
    with pytest.raises(CheckpointError, match=r"x\.ckpt: 1 dtype mismatches \(norm\.bias: checkpoint float64"):
        load_state_dict_into(cell, state, source="x.ckpt", dtype_policy="require same dtype")


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda s: s.pop("norm.bias"), r"1 missing \(norm\.bias\)"),
        (lambda s: s.update({"proj.lora_down.weight": np.zeros((2, 3), np.float32)}), r"unexpected \(proj\.lora_down"),
        (
            lambda s: s.update({"proj.weight": np.zeros((3, 4), np.float32)}),
            r"proj\.weight: checkpoint \(3, 4\) vs model \(4, 3\)",
        ),
    ],
)
def test_load_errors_name_the_key_and_change_nothing(rng, edit, pattern):
    cell = _Small()
    before = cell_state_dict(cell)
    state = _small_state(rng)
    edit(state)
    with pytest.raises(CheckpointError, match=rf"^lora\.safetensors: state dict does not match the model: .*{pattern}"):
        load_state_dict_into(cell, state, source="lora.safetensors")
    for key, value in cell_state_dict(cell).items():
        np.testing.assert_array_equal(value, before[key])


def test_allowed_patterns_pass(rng):
    cell = _Small()
    state = _small_state(rng)
    del state["norm.weight"], state["norm.bias"]
    state["proj.lora_up.weight"] = np.zeros((4, 2), np.float32)
    report = load_state_dict_into(cell, state, allow_missing=("norm.*",), allow_unexpected=(r".*\.lora_(up|down)\..*",))
    assert report.ok and report.allowed_missing == ["norm.weight", "norm.bias"]
    assert report.allowed_unexpected == ["proj.lora_up.weight"]


def test_report_lists_first_keys_and_count():
    expected = {f"k{i}": (1,) for i in range(8)}
    report = check_state_dict(expected, {})
    with pytest.raises(CheckpointError, match=r"src: .*8 missing \(k0, k1, k2, k3, k4, \.\.\. 3 more\)"):
        report.raise_if_errors("src")
