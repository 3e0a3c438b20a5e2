"""YAML model configs: loading with OmegaConf and building objects from ``target``/``params`` nodes.

Every ``params`` key is checked against the target's constructor before anything is built, so a typo in a config
fails with one line naming the file, the config path and the key instead of a TypeError deep inside a network.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config file cannot be read or does not describe a buildable object."""


def cache_root() -> Path:
    """The user's cache folder for this package: ``$LDM_CACHE_DIR``, else ``$XDG_CACHE_HOME/ldm``, else
    ``~/.cache/ldm`` (FID weights, compiled graphs)."""
    import os

    if os.environ.get("LDM_CACHE_DIR"):
        return Path(os.environ["LDM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm"


def check_output_folder(path, option: str) -> None:
    """Fail before any work, naming ``option``, if folder ``path`` cannot be created or written: a file is in the
    way or the nearest existing folder is not writable (the CLIs would otherwise fail only when saving results)."""
    import os

    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: folder {existing} is not writable")


def read_text_utf8(path) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped); other bytes are a ``ValueError`` naming the
    file, line and column, where Python's own message names neither."""
    with open(path, "rb") as f:
        data = f.read()
    data = data.removeprefix(b"\xef\xbb\xbf")  # as Excel and Notepad write
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: byte 0x{data[err.start]:02x} at column {column} is not UTF-8; "
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def load_config(path: str | Path) -> DictConfig:
    """Read a YAML config; parse errors and non-mapping files raise ``ConfigError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # OmegaConf/yaml raise many types; all mean "unreadable YAML"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: invalid YAML: {first_line}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return cfg


def get_obj_from_str(target: str) -> Any:
    module, _, name = target.rpartition(".")
    if not module:
        raise ConfigError(f"target {target!r} is not a dotted import path")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import target {target!r}: {exc}") from exc


def _accepted_params(obj: Any) -> tuple[set[str], bool]:
    sig = inspect.signature(obj)
    names = {p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return names, has_var_kw


def validate_config(config: Any, where: str = "model") -> None:
    """Check a ``target``/``params`` tree recursively (nodes ending in ``_config`` are nested targets)."""
    if not isinstance(config, (dict, DictConfig)):
        raise ConfigError(f"{where}: expected a mapping with 'target' and 'params'")
    extra = set(config.keys()) - {"target", "params"}
    if extra:
        raise ConfigError(f"{where}: unknown config key {sorted(extra)[0]!r} (valid: 'target', 'params')")
    if "target" not in config:
        raise ConfigError(f"{where}: missing 'target'")
    obj = get_obj_from_str(str(config["target"]))
    params = config.get("params") or {}
    accepted, has_var_kw = _accepted_params(obj)
    for key in params:
        if key not in accepted and not has_var_kw:
            valid = ", ".join(sorted(accepted))
            raise ConfigError(f"{where}.params: unknown config key {key!r} for {config['target']} (valid: {valid})")
        if str(key).endswith("_config") and params[key] is not None:
            validate_config(params[key], f"{where}.params.{key}")


def instantiate_from_config(config: Any, **overrides: Any) -> Any:
    """Build ``target(**params, **overrides)``; nested ``*_config`` nodes are passed through as plain dicts."""
    validate_config(config)
    params = config.get("params") or {}
    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    return get_obj_from_str(str(config["target"]))(**dict(params), **overrides)


# The bundled model configs ship inside the package (package data), so an installed copy finds them too.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# --version shortcuts shared by the CLIs -> bundled model config (image size and family come from the config)
VERSIONS = {
    "1.5": "v1-inference.yaml",
    "2.0": "v2-inference.yaml",
    "2.1": "v2-inference.yaml",
    "2.0-v": "v2-inference-v.yaml",
    "2.1-v": "v2-inference-v.yaml",
}


def config_for_version(version: str) -> Path:
    if version not in VERSIONS:
        raise ConfigError(f"unknown --version {version!r} (choose from {', '.join(VERSIONS)})")
    return CONFIG_DIR / VERSIONS[version]
