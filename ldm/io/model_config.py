"""The one model-config resolver used by convert, generate and train (no MindSpore import).

A model config comes from, in this order: an explicit YAML path, a ``--version`` shortcut, the weights themselves
(a diffusers folder's ``config.json`` files, or the config embedded in one of our ``.safetensors`` files), then a
fallback YAML or version the caller names. Relative YAML paths are looked up next to the file that names them (a
training YAML), then in the working directory, then among the bundled configs (``ldm/configs/``, package data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.io.checkpoint import CheckpointError, read_metadata
from ldm.io.diffusers_format import config_from_diffusers, is_diffusers_folder
from ldm.util import CONFIG_DIR, ConfigError, config_for_version, load_config

CONFIG_METADATA_KEY = "ldm_config"


@dataclass
class ResolvedConfig:
    """A model config and where it came from (shown to the user and written to sample sidecars)."""

    config: Any
    label: str


def find_config_file(path: str | Path, base_dir: str | Path | None = None) -> Path:
    """``path`` as given when absolute or present; else relative to ``base_dir``, then among the bundled configs
    (``CONFIG_DIR``): a leading ``configs/`` or ``ldm/configs/`` names that folder, so ``ldm/configs/v1-inference.yaml``
    (the spelling of the repository's old layout) still works. Raises ``ConfigError`` naming the places."""
    path = Path(path)
    candidates = [path] if path.is_absolute() else [*([Path(base_dir) / path] if base_dir else []), path]
    if not path.is_absolute():
        parts = path.parts
        for prefix in (("ldm", CONFIG_DIR.name), (CONFIG_DIR.name,)):
            if parts[: len(prefix)] == prefix:
                parts = parts[len(prefix) :]
                break
        candidates.append(CONFIG_DIR.joinpath(*parts))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{path}: config file not found (looked in {', '.join(str(c) for c in candidates)})")


def config_from_checkpoint(path: str | Path) -> dict | None:
    """The model config embedded in one of our ``.safetensors`` files, or None."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    text = read_metadata(path).get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise CheckpointError(f"{path}: metadata key {CONFIG_METADATA_KEY!r} is not valid JSON") from None


def config_of_weights(path: str | Path) -> ResolvedConfig | None:
    """The config a diffusers folder or one of our files carries, or None."""
    if is_diffusers_folder(path):
        return ResolvedConfig(config_from_diffusers(path), f"{path} (diffusers config)")
    embedded = config_from_checkpoint(path)
    return None if embedded is None else ResolvedConfig(embedded, f"{path} (embedded config)")


def resolve_model_config(
    config: str | Path | None = None,
    version: str | None = None,
    checkpoint: str | Path | None = None,
    fallback: str | Path | None = None,
    fallback_version: str | None = None,
    base_dir: str | Path | None = None,
) -> ResolvedConfig:
    """The model config: ``config`` (YAML) > ``version`` > the one ``checkpoint`` carries > ``fallback`` (YAML) >
    ``fallback_version``; ``ConfigError`` when none applies. YAML paths are found with :func:`find_config_file`."""
    if config:
        found = find_config_file(config, base_dir)
        return ResolvedConfig(load_config(found), str(config))
    if version:
        return ResolvedConfig(load_config(config_for_version(version)), version)
    if checkpoint:
        carried = config_of_weights(checkpoint)
        if carried is not None:
            return carried
    if fallback:
        return ResolvedConfig(load_config(find_config_file(fallback, base_dir)), str(fallback))
    if fallback_version:
        return ResolvedConfig(load_config(config_for_version(fallback_version)), fallback_version)
    source = f"{checkpoint}: " if checkpoint else ""
    raise ConfigError(f"{source}cannot tell the model architecture; pass --config or --version")
