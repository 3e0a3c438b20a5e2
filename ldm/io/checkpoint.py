"""Read and write state dicts (name -> numpy array) as ``.safetensors`` or MindSpore ``.ckpt`` files.

``.ckpt`` is ambiguous: MindSpore writes protobuf, PyTorch Lightning writes a torch zip pickle. The first bytes tell
them apart. PyTorch pickles (``.ckpt``/``.pt``/``.pth``/``.bin``) are only read with ``allow_pickle=True``, through
the restricted unpickler of :mod:`ldm.io.torch_pickle`. Writes go to a temp file in the target directory and are
renamed into place, so a failed write leaves any previous file untouched.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ldm.atomic import atomic_path
from ldm.io.errors import CheckpointError, CheckpointWriteError, bfloat16_bits_to_float32
from ldm.io.torch_pickle import load_torch_file

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "bfloat16_bits_to_float32",
    "check_all_finite",
    "read_metadata",
    "read_state_dict",
    "write_state_dict",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_ZIP_MAGIC = b"PK\x03\x04"
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def _pickle_refused(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: is a PyTorch pickle checkpoint; pickle files can run arbitrary code when loaded, so they are read "
        "only with --allow_pickle (allow_pickle=True; tensors are rebuilt by a restricted unpickler). Prefer a "
        ".safetensors copy, and only allow pickles from sources you trust"
    )


def _is_torch_pickle(path: Path) -> bool:
    """True for a torch zip archive or a legacy torch pickle; MindSpore protobuf starts with neither."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == _ZIP_MAGIC or head[:1] == b"\x80"


def read_state_dict(path, allow_pickle: bool = False, check_finite: bool = True) -> dict[str, np.ndarray]:
    """Arrays of a ``.safetensors``, MindSpore ``.ckpt`` or (with ``allow_pickle``) PyTorch checkpoint file.

    With ``check_finite`` (the default) a floating-point tensor holding NaN or infinity is refused by key: such
    weights (a diverged run, a bad conversion, a damaged download) would only make every output NaN much later.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES or (suffix == ".ckpt" and _is_torch_pickle(path)):
        if not allow_pickle:
            raise _pickle_refused(path)
        state = load_torch_file(path)
    elif suffix == ".ckpt":
        state = _read_mindspore(path)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint format {suffix!r} (use .safetensors, .ckpt, .pt, .pth or .bin)"
        )
    if check_finite:
        check_all_finite(state, path)
    return state


def check_all_finite(state_dict: dict[str, np.ndarray], path) -> None:
    """Raise ``CheckpointError`` naming the first floating-point tensor of ``path`` that holds NaN or infinity."""
    for key, value in state_dict.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
            raise CheckpointError(
                f"{path}: tensor {key!r} holds {nan} NaN and {inf} infinite values; refusing to use it (the run "
                "that wrote it diverged or the file is damaged)"
            )


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON object hook refusing a key given twice (JSON parsers silently keep one of them)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """Parsed JSON header and the byte offset where tensor data starts; checks the file holds all tensor bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors header: {n} bytes declared, {size - 8} present")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_unique_keys)
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
    data_start = 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            itemsize = SAFETENSORS_ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for key {key!r}") from None
        if not 0 <= begin <= end or min(shape, default=0) < 0:
            raise CheckpointError(f"{path}: corrupt safetensors header: key {key!r} has offsets {[begin, end]}")
        if math.prod(shape) * itemsize != end - begin:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: key {key!r} is {info['dtype']} {shape} "
                f"({math.prod(shape) * itemsize} bytes) but spans {end - begin} bytes"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: key {key!r} needs bytes up to {data_start + end}, file has {size}"
            )
    return header, data_start


# Safetensors dtypes read straight from the file (little-endian, as the format stores them).
_SAFETENSORS_NUMPY = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}  # fmt: skip


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``path`` as a numpy array.

    ``safe_open`` validates the file (header, offsets, overlaps); the bytes are then read with plain file reads into
    fresh arrays rather than through its memory map, whose touched pages stay resident until the file is closed:
    for a 5 GB SD2 checkpoint that map added 4.3 GiB to the peak memory of loading on top of the arrays themselves.
    """
    from safetensors import SafetensorError, safe_open

    header, data_start = _safetensors_header(path)
    out: dict[str, np.ndarray] = {}
    bf16 = 0
    try:
        with safe_open(str(path), framework="numpy") as f, open(path, "rb") as raw:
            for key in f.keys():
                info = header[key]
                begin, end = info["data_offsets"]
                raw.seek(data_start + begin)
                if info["dtype"] == "BF16":
                    bits = np.fromfile(raw, "<u2", count=(end - begin) // 2)
                    out[key] = bfloat16_bits_to_float32(bits).reshape(info["shape"])
                    bf16 += 1
                elif info["dtype"] in _SAFETENSORS_NUMPY:
                    dtype = np.dtype(_SAFETENSORS_NUMPY[info["dtype"]])
                    out[key] = np.fromfile(raw, dtype, count=(end - begin) // dtype.itemsize).reshape(info["shape"])
                else:
                    out[key] = f.get_tensor(key)
    except (SafetensorError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors: {e}") from e
    if bf16:
        warnings.warn(f"{path}: {bf16} bfloat16 tensors were converted to float32", stacklevel=3)
    return out


def _read_mindspore(path: Path) -> dict[str, np.ndarray]:
    import mindspore as ms

    try:
        params = ms.load_checkpoint(str(path))
    except (ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read MindSpore checkpoint: {e}") from e
    return {name: p.asnumpy() for name, p in params.items()}


def read_metadata(path) -> dict[str, str]:
    """The ``__metadata__`` string map of a ``.safetensors`` header ({} if absent or for other formats)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return dict(_safetensors_header(path)[0].get("__metadata__") or {})


def write_state_dict(path, state_dict: dict, metadata: dict[str, str] | None = None) -> None:
    """Write arrays atomically as ``.safetensors`` (with optional string metadata) or MindSpore ``.ckpt``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".ckpt"):
        raise CheckpointError(f"{path}: cannot write {suffix!r}; use .safetensors or .ckpt")
    if metadata and suffix != ".safetensors":
        raise CheckpointError(f"{path}: metadata can only be stored in .safetensors files")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise CheckpointError(f"{path}: metadata key {key!r} must map a str to a str, got {type(value).__name__}")
    arrays = {name: np.asarray(value, order="C") for name, value in state_dict.items()}
    with checkpoint_write(path, "any previous file") as tmp:
        if suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(arrays, tmp, metadata=metadata)
        else:
            import mindspore as ms

            ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()], str(tmp))


@contextmanager
def checkpoint_write(path, previous: str) -> Iterator[Path]:
    """``ldm.atomic.atomic_path`` whose I/O errors become one ``CheckpointWriteError`` naming ``path`` and saying
    that ``previous`` (e.g. "the previous state") is unchanged."""
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as e:
        raise CheckpointWriteError(f"{path}: write failed ({e.strerror or e}); {previous} is unchanged") from e
