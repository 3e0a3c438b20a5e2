"""Test session set-up: ``ldm`` is imported before mindspore (oneDNN ISA default), tests run in PyNative mode
unless a test switches to graph mode itself (use the ``graph_mode`` fixture), and the CLIs' compile cache (on by
default) goes to a folder of this session, removed at its end, never to the user's cache; the session keeps every
configuration's folder (no least-recently-used deletion), so a test's timing does not depend on the others."""

# ruff: noqa: I001  (ldm must be imported before mindspore)

import atexit
import os
import shutil
import tempfile

import ldm  # noqa: F401  (must precede mindspore)
import mindspore as ms
import numpy as np
import pytest

from ldm.compile_cache import KEEP_VAR, ROOT_VAR
from ldm.env import init_env

init_env("CPU", mode=1)

os.environ[ROOT_VAR] = tempfile.mkdtemp(prefix="ldm-test-compile-cache-")
atexit.register(shutil.rmtree, os.environ[ROOT_VAR], ignore_errors=True)
os.environ[KEEP_VAR] = "100000"


@pytest.fixture
def graph_mode():
    """Run the test body in GRAPH_MODE and switch back to PyNative afterwards."""
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
