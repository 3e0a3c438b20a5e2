"""Forked children that SIGKILL themselves at a chosen point, for the catalogue's kill cases."""

from __future__ import annotations

import os
import signal


def die() -> None:
    """SIGKILL this process (no cleanup, no ``finally``: what a power cut or the OOM killer does)."""
    os.kill(os.getpid(), signal.SIGKILL)


def in_killed_child(action) -> int:
    """Run ``action`` in a forked child; return the signal that ended it (0 if it exited)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            action()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
