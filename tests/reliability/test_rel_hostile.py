"""Reliability: hostile and damaged checkpoint files. Pickle payloads are refused without --allow_pickle and never
executed with it; safetensors files with a lying header are refused by name before any tensor is read; NaN/Inf
weights are refused naming the tensor. Each case goes through a real CLI entry point (in-process ``main``) as well."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

import ldm  # noqa: F401  (must precede mindspore)
from ldm.io.checkpoint import CheckpointError, read_state_dict, write_state_dict
from ldm.lora.cli import main as lora_main


class Payload:
    """Pickles to a call of ``func(arg)``: what a malicious checkpoint does when it is unpickled."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payloads(marker):
    touch = f"touch {marker}"
    import builtins
    import subprocess

    return {
        "os.system": Payload(os.system, touch),
        "builtins.eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
        "nested in a state dict": {"state_dict": {"w": Payload(os.system, touch)}},
    }


PAYLOADS = ["os.system", "builtins.eval", "builtins.exec", "subprocess.call", "nested in a state dict"]


def _zip_pickle(path, obj):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
    return path


@pytest.mark.parametrize("name", PAYLOADS)
def test_pickle_payload_refused_by_default(tmp_path, capsys, name):
    """A torch-zip .ckpt whose pickle runs a command is refused without --allow_pickle; the command never runs."""
    marker = tmp_path / "pwned"
    src = _zip_pickle(tmp_path / "model.ckpt", _payloads(marker)[name])
    assert lora_main(["merge", str(src), str(src), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--allow_pickle" in err[0], err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("name", PAYLOADS)
def test_pickle_payload_not_executed_when_allowed(tmp_path, name):
    """With allow_pickle the restricted unpickler refuses the global by name and the command never runs."""
    marker = tmp_path / "pwned"
    src = _zip_pickle(tmp_path / "model.pt", _payloads(marker)[name])
    with pytest.raises(CheckpointError, match=r"model\.pt: refusing to unpickle global"):
        read_state_dict(src, allow_pickle=True)
    assert not marker.exists()


def test_legacy_pickle_payload_not_executed_when_allowed(tmp_path):
    """A pre-zip (raw) pickle with a payload is refused as a format, without being unpickled."""
    marker = tmp_path / "pwned"
    src = tmp_path / "old.bin"
    src.write_bytes(pickle.dumps(Payload(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(CheckpointError, match=r"old\.bin: legacy"):
        read_state_dict(src, allow_pickle=True)
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_not_unpickled(tmp_path):
    """A pickle renamed to .safetensors is read as safetensors (and fails as one), never unpickled."""
    marker = tmp_path / "pwned"
    src = tmp_path / "model.safetensors"
    src.write_bytes(pickle.dumps(Payload(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: "):
        read_state_dict(src)
    assert not marker.exists()


def _safetensors(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def _raw_header(text: str, data: bytes) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32x4 = np.arange(4, dtype=np.float32).tobytes()
LYING = {
    "offsets past the end": (_safetensors({"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}, F32x4),
                             "needs bytes up to"),
    "offsets reversed": (_safetensors({"w": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, F32x4),
                         "offsets"),
    "negative offset": (_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, F32x4),
                        "offsets"),
    "huge header length": (_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, F32x4,
                                        header_len=2**62), "truncated safetensors header"),
    "huge declared shape": (_safetensors({"w": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]}},
                                         F32x4), "spans 16 bytes"),
    "huge shape and offsets": (_safetensors({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}},
                                            F32x4), "needs bytes up to"),
    "dtype does not match bytes": (_safetensors({"w": {"dtype": "F64", "shape": [4], "data_offsets": [0, 16]}}, F32x4),
                                   "spans 16 bytes"),
    "shape does not match bytes": (_safetensors({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}},
                                                F32x4), "spans 16 bytes"),
    "unknown dtype": (_safetensors({"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, F32x4),
                      "entry for key 'w'"),
    "duplicate keys": (_raw_header('{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
                                   '"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', F32x4),
                       "key 'w' appears twice"),
    "overlapping tensors": (_safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, F32x4),
                            "cannot read safetensors"),
    "header not an object": (_raw_header("[1, 2, 3]", F32x4), "not a JSON object"),
    "header not JSON": (_raw_header("{nope", F32x4), "corrupt safetensors header"),
    "missing data_offsets": (_safetensors({"w": {"dtype": "F32", "shape": [4]}}, F32x4), "entry for key 'w'"),
    "shorter than 8 bytes": (b"\x10\x00", "no header length"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LYING))
def test_lying_safetensors_header_is_refused(tmp_path, capsys, case):
    """A safetensors file whose header lies is refused naming the file (library call and CLI: one error line)."""
    content, needle = LYING[case]
    src = tmp_path / "adapter.safetensors"
    src.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(src)
    assert str(err.value).startswith(str(src)) and needle in str(err.value), str(err.value)
    out = tmp_path / "out.safetensors"
    assert lora_main(["export", str(src), str(out), "--format", "kohya"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {src}"), lines
    assert not out.exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path, bad, dtype):
    """A checkpoint holding NaN or +-Inf in any float tensor is refused naming that tensor and the counts."""
    weights = {"ok": np.ones(3, dtype), "model.diffusion_model.out.2.weight": np.array([1.0, bad, 2.0], dtype)}
    src = tmp_path / "base.safetensors"
    write_state_dict(src, weights)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.diffusion_model\.out\.2\.weight' holds"):
        read_state_dict(src)


def test_nan_adapter_is_refused_by_merge_and_base_is_untouched(tmp_path, capsys):
    """python -m ldm.lora merge with a NaN adapter fails with one line naming it; no output is written."""
    base = tmp_path / "base.safetensors"
    write_state_dict(base, {"model.diffusion_model.w": np.ones((2, 2), np.float32)})
    before = base.read_bytes()
    adapter = tmp_path / "lora.safetensors"
    write_state_dict(adapter, {"a.lora_down.weight": np.full((1, 2), np.nan, np.float32)})
    out = tmp_path / "merged.safetensors"
    assert lora_main(["merge", str(base), str(adapter), str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(adapter) in lines[0] and "NaN" in lines[0], lines
    assert not out.exists() and base.read_bytes() == before


def test_integer_tensors_are_not_checked_for_nan(tmp_path):
    """Only floating tensors are checked (position ids and step counters are integers)."""
    src = tmp_path / "ids.safetensors"
    write_state_dict(src, {"position_ids": np.arange(77, dtype=np.int64)})
    assert read_state_dict(src)["position_ids"][-1] == 76
