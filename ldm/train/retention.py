"""``checkpoints_total_limit``: keep the newest N weight files of a run's ``ckpt/`` folder, and always the one the
train state points to (a resume needs it)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

LOGGER = logging.getLogger("ldm.train")
WEIGHTS_NAME = re.compile(r"^(lora|unet)-(\d+)\.safetensors$")


def weight_files(ckpt_dir: Path) -> list[Path]:
    """The run's weight files (``lora-<step>.safetensors`` / ``unet-<step>.safetensors``), oldest step first."""
    found = [(int(m.group(2)), p) for p in Path(ckpt_dir).iterdir() if (m := WEIGHTS_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_weights(ckpt_dir: Path, limit: int, keep: str | None) -> list[Path]:
    """Delete all but the newest ``limit`` weight files, never the file named ``keep``; returns what was deleted."""
    files = weight_files(ckpt_dir)
    doomed = [p for p in files[: max(len(files) - limit, 0)] if p.name != keep]
    for path in doomed:
        path.unlink()
    if doomed:
        LOGGER.info("checkpoints_total_limit %d: deleted %s", limit, ", ".join(p.name for p in doomed))
    return doomed
