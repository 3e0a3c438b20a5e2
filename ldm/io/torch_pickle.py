"""Read PyTorch zip checkpoints (``torch.save``) and TorchScript archives (``torch.jit.save``) without torch.

A pickle may name any importable function and call it while loading, so :class:`SafeUnpickler` resolves only the
globals that rebuilding tensors needs, each replaced by a function of ours, and refuses every other one with
:class:`UnsafePickleError` before anything is called. Tensor bytes come from the archive's ``data/<key>`` records.
TorchScript modules are rebuilt as inert placeholder objects whose attribute dicts hold the parameters and buffers.
"""

from __future__ import annotations

import collections
import math
import pickle
import warnings
import zipfile

import numpy as np

from ldm.io.errors import CheckpointError, bfloat16_bits_to_float32

# torch storage class -> numpy dtype of one element; bfloat16 is read as its raw 16 bits and widened to float32.
_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "DoubleStorage": "f8",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "UntypedStorage": "u1",
}
_JIT_LIST_BUILDERS = {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"}


class UnsafePickleError(CheckpointError):
    """The pickle names a global that is not needed to rebuild tensors (possibly malicious)."""


class _StorageType:
    """Stands for ``torch.<X>Storage``; only its element dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.bfloat16 = name == "BFloat16Storage"
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A flat array holding one storage record of the archive."""

    def __init__(self, array: np.ndarray, bfloat16: bool):
        self.array = array
        self.bfloat16 = bfloat16


class _Opaque:
    """Inert stand-in for a class we do not import (TorchScript ``__torch__.*`` modules, Lightning callbacks)."""

    def __init__(self, *args):
        self.args = args
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _NumpyDType:
    """Stands for ``numpy.dtype(name, align, copy)`` as pickled; its ``__setstate__`` state is ignored."""

    def __init__(self, name: str, align: bool = False, copy: bool = False):
        self.dtype = np.dtype(name)

    def __setstate__(self, state):
        pass


def _numpy_scalar(dtype: _NumpyDType, data: bytes):
    return np.frombuffer(data, dtype.dtype)[0]


def _codecs_encode(text: str, encoding: str) -> bytes:
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"unexpected encoding {encoding!r} in _codecs.encode")
    return text.encode(encoding)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _first_arg(value, *_):
    return value


class SafeUnpickler(pickle.Unpickler):
    """Unpickler of a torch archive's ``data.pkl`` that rebuilds tensors as numpy arrays and refuses other globals."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix
        self.path = path
        self.big_endian = self._byteorder() == b"big"
        self.storages: dict[str, _Storage] = {}
        self.opaque_classes: dict[str, type] = {}
        self.bfloat16_count = 0

    def _byteorder(self) -> bytes:
        try:
            return self.archive.read(self.prefix + "byteorder").strip()
        except KeyError:  # archives written before torch 1.9 have no record and are little-endian
            return b"little"

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch.jit._pickle" and (name in _JIT_LIST_BUILDERS or name == "restore_type_tag"):
            return _first_arg
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _numpy_scalar
        if (module, name) == ("numpy", "dtype"):
            return _NumpyDType
        if (module, name) == ("_codecs", "encode"):
            return _codecs_encode
        if (
            module == "__torch__"
            or module.startswith("__torch__.")
            or ((module, name) == ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"))
        ):
            key = f"{module}.{name}"
            if key not in self.opaque_classes:
                self.opaque_classes[key] = type(name, (_Opaque,), {"__module__": module})
            return self.opaque_classes[key]
        raise UnsafePickleError(
            f"{self.path}: refusing to unpickle global '{module}.{name}': it is not needed to rebuild tensors "
            "and loading it could run arbitrary code"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unsupported persistent id {pid!r} in data.pkl")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.path}: storage {key!r} has no torch storage type")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(self._read_storage(key, storage_type, numel), storage_type.bfloat16)
        return self.storages[key]

    def _read_storage(self, key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
        """Read record ``data/<key>`` straight into a writable array (one copy of the bytes in memory)."""
        dtype = storage_type.dtype.newbyteorder(">" if self.big_endian else "<")
        array = np.empty(numel, dtype)
        buffer = memoryview(array).cast("B")
        filled = 0
        try:
            with self.archive.open(f"{self.prefix}data/{key}") as f:
                while filled < len(buffer) and (n := f.readinto(buffer[filled:])):
                    filled += n
        except KeyError:
            raise CheckpointError(f"{self.path}: archive record {self.prefix}data/{key} is missing") from None
        if filled < len(buffer):
            raise CheckpointError(
                f"{self.path}: storage {key!r} has {filled} bytes, expected {len(buffer)} "
                f"({numel} x {storage_type.name}); the file is truncated or corrupt"
            )
        return array.astype(dtype.newbyteorder("="), copy=False)

    def _rebuild_tensor(self, storage, offset, size, stride, *_):
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"{self.path}: tensor without a storage record")
        flat = storage.array
        size, stride = tuple(size), tuple(stride)
        if 0 in size:
            out = np.zeros(size, flat.dtype)
        elif offset == 0 and stride == _contiguous_strides(size) and flat.size == math.prod(size):
            out = flat.reshape(size)  # the whole storage, as torch.save writes most state-dict tensors: no copy
        else:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if offset < 0 or any(s < 0 for s in stride) or last >= flat.size or len(size) != len(stride):
                raise CheckpointError(
                    f"{self.path}: tensor view (offset {offset}, size {size}, stride {stride}) lies outside its "
                    f"storage of {flat.size} elements"
                )
            view = np.lib.stride_tricks.as_strided(flat[offset:], size, [s * flat.itemsize for s in stride])
            out = np.array(view, order="C")
        if storage.bfloat16:
            self.bfloat16_count += 1
            out = bfloat16_bits_to_float32(out)
        return out


def _contiguous_strides(size: tuple) -> tuple:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _flatten(obj, prefix: str, out: dict[str, np.ndarray]) -> None:
    """Collect arrays under dotted paths through dicts and TorchScript objects; other leaves are dropped."""
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, _Opaque):
        _flatten(obj.state, prefix, out)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    for name in archive.namelist():
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "data.pkl":
            return parts[0] + "/"
    raise CheckpointError(f"{path}: zip archive has no '<name>/data.pkl' record; it is not a PyTorch checkpoint")


def load_torch_file(path) -> dict[str, np.ndarray]:
    """Tensors of a ``torch.save`` zip checkpoint or a TorchScript archive, by dotted name, as numpy arrays.

    A top-level ``{"state_dict": {...}}`` wrapper is unwrapped; other nested dicts and TorchScript submodules are
    joined with dots (``layers.conv.weight``). Non-tensor values are dropped. bfloat16 becomes float32 (a warning
    says so). Legacy (pre-1.6, non-zip) files are refused.
    """
    path = str(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":
            raise CheckpointError(f"{path}: truncated or corrupt zip archive (no central directory)")
        if head[:1] == b"\x80":
            raise CheckpointError(
                f"{path}: legacy (pre-1.6, non-zip) PyTorch pickle format is not supported; re-save it with a "
                "recent torch.save, or convert it to .safetensors, in an environment you trust"
            )
        raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (no zip signature)")
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive, path)
            with archive.open(prefix + "data.pkl") as f:
                unpickler = SafeUnpickler(f, archive, prefix, path)
                obj = unpickler.load()
    except CheckpointError:
        raise
    except Exception as e:  # the file is untrusted: any failure while decoding it is reported against the file
        raise CheckpointError(f"{path}: cannot read PyTorch archive: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    if unpickler.bfloat16_count:
        warnings.warn(f"{path}: {unpickler.bfloat16_count} bfloat16 tensors were converted to float32", stacklevel=2)
    return out
