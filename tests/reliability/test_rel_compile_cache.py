"""Reliability: the default compile cache never costs a run. A cache folder that cannot be written (read-only home,
a file in its place) leaves the run uncached with one log line; a graph file cut short (a run killed while MindSpore
wrote it) is reported by MindSpore and recompiled, with the right result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from ldm.compile_cache import ROOT_VAR, use_compile_cache
from ldm.train.options import TrainOptions

OPTS = TrainOptions(data_path="data", output_path="out")

# One graph whose result depends on its width: a stale or broken reload would print another sum.
SCRIPT = textwrap.dedent(
    """
    import sys
    import ldm  # noqa: F401  (before mindspore)
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops
    from ldm.compile_cache import use_compile_cache
    from ldm.env import init_env
    from ldm.train.options import TrainOptions

    class Net(nn.Cell):
        def construct(self, x):
            return ops.matmul(x, x.T).sum()

    init_env("CPU", mode=0, threads=1)
    print(use_compile_cache(True, 0, "probe", TrainOptions(), {}, log=lambda m: None))
    print(float(Net()(ms.Tensor(np.ones((2, 3), np.float32)))))
    """
)


def test_unwritable_cache_folder_leaves_the_run_uncached(tmp_path, monkeypatch):
    """A cache folder that cannot be created: no cache, one log line naming it, no error."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv(ROOT_VAR, str(blocker / "compile"))
    lines = []
    assert use_compile_cache(True, 0, "train", OPTS, {}, log=lines.append) is None
    assert len(lines) == 1 and "compiling without it" in lines[0] and str(blocker) in lines[0]


def test_truncated_graph_file_is_recompiled(tmp_path):
    """A graph file cut short is recompiled: the second run in the same folder prints the right sum."""
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    env = {**os.environ, ROOT_VAR: str(tmp_path / "cc")}

    def run() -> list:
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    folder, total = run()
    assert total == "12.0"
    graphs = sorted((Path(folder) / "rank_0/graph_cache").glob("*.mindir"))
    assert graphs
    os.chmod(graphs[0], 0o600)
    with open(graphs[0], "r+b") as f:
        f.truncate(100)
    assert run() == [folder, "12.0"]  # the same folder: the key is stable across processes
