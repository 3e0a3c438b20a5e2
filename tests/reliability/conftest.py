"""The reliability catalogue: every test in this folder is one case; the run ends with one line per case and a count.

The printed table (``make test`` shows it after the usual summary) is the catalogue: case id, outcome and what the
case checks (first line of the test's docstring; parametrized cases add their parameters to the id).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_OUTCOMES: dict[str, tuple[str, str]] = {}


def pytest_runtest_logreport(report):
    if not Path(str(report.fspath)).resolve().is_relative_to(HERE):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _OUTCOMES[report.nodeid] = (report.outcome, _OUTCOMES.get(report.nodeid, ("", ""))[1])


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE):
            doc = (getattr(item.function, "__doc__", None) or "").strip().splitlines()
            _OUTCOMES.setdefault(item.nodeid, ("not run", doc[0] if doc else ""))


def pytest_terminal_summary(terminalreporter):
    ran = {k: v for k, v in _OUTCOMES.items() if v[0] != "not run"}
    if not ran:
        return
    terminalreporter.section("reliability catalogue")
    for nodeid, (outcome, doc) in ran.items():
        name = nodeid.split("reliability/", 1)[-1]
        terminalreporter.write_line(f"{outcome.upper():7} {name}  {doc}")
    passed = sum(outcome == "passed" for outcome, _ in ran.values())
    terminalreporter.write_line(f"reliability catalogue: {len(ran)} cases, {passed} passed")


@pytest.fixture
def disk_full_save_file():
    """A stand-in for ``safetensors.numpy.save_file`` that fills the disk half-way: it writes half the file, then
    raises ENOSPC, as a full disk does."""
    import safetensors.numpy

    save_file = safetensors.numpy.save_file

    def disk_full(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return disk_full
