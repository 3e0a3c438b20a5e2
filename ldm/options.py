"""Option schemas shared by the CLIs: a dataclass whose fields carry their help and choices becomes a parser, a
checked YAML options file and a validated value, with no MindSpore import (``-h`` and bad options answer at once).

A field made with :func:`option` is a ``--flag`` (kebab spelling accepted) and a key of the options file. Values come
from defaults < the options file < the command line. A YAML key that is not an option, a value of the wrong type or
outside the field's choices is an error naming the file (or flag) and key. Booleans take a value (``--flag False``)
or none (``--flag`` means True). A list option takes its items after the flag, and repeating the flag adds more;
the command line's list replaces the file's.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ldm.cli import Parser, str2bool
from ldm.memory_plan import check_max_memory_gib
from ldm.names import DEVICE_TARGETS
from ldm.precision import PRECISIONS
from ldm.util import ConfigError

_SEEN_LISTS = "_lists_given"  # namespace attribute: list options already given once on this command line


def optional_float(value):
    """A float, or None for an empty/None value (an optional number in YAML and on the command line)."""
    return None if value in ("", "None", "none", None) else float(value)


def optional_int(value):
    """An int, or None for an empty/None value."""
    return None if value in ("", "None", "none", None) else int(value)


def option(default, help: str, choices=None, parse=None, items=None, cli: bool = True):
    """A dataclass field whose metadata holds what the parser needs: help, choices, value parser, list item type,
    and whether it is a flag at all (``cli=False``: set by the parser itself)."""
    meta = {"help": help, "choices": choices, "parse": parse, "items": items, "cli": cli}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunOptions:
    """Options every run of the models has (training and generation spell and check them alike); a schema
    inherits them, so they come first in its ``-h``."""

    device_target: str = option("CPU", "CPU, GPU or Ascend", choices=DEVICE_TARGETS)
    mode: int | None = option(
        None,
        "0 = GRAPH_MODE (compiled), 1 = PYNATIVE_MODE (op by op); not set: the memory plan chooses (docs/"
        "memory_and_precision.md)",
        choices=(0, 1),
        parse=optional_int,
    )
    max_memory_gib: float | None = option(
        None,
        "memory the run may use, in GiB, for the memory plan (not set: the cgroup limit or MemAvailable; on "
        "GPU/Ascend the device's memory)",
        parse=optional_float,
    )
    use_fp16: bool = option(False, "mindone's alias: True means --precision fp16")
    vae_precision: str | None = option(
        None, "VAE compute dtype (not set: fp32 under an fp16 UNet, else the UNet's)", choices=PRECISIONS
    )
    text_encoder_precision: str | None = option(
        None, "text encoder compute dtype (not set: the UNet's)", choices=PRECISIONS
    )
    enable_flash_attention: bool = option(
        False, "UNet attention through the fused FlashAttentionScore kernel (Ascend only; elsewhere a warning)"
    )
    compile_cache: bool = option(
        True, "graph mode: reuse compiled graphs from $LDM_CACHE_DIR/compile/<job>-<configuration key> (False: off)"
    )


def check_run_options(opts, source: str) -> None:
    """The options every run shares that need more than their type: ``max_memory_gib`` is a positive number."""
    check_max_memory_gib(opts.max_memory_gib, f"{source}: max_memory_gib")


def cli_fields(schema) -> list:
    """The fields of ``schema`` that are flags and file keys."""
    return [f for f in dataclasses.fields(schema) if f.metadata.get("cli", False)]


def default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def value_parser(f: dataclasses.Field):
    """The function turning one command-line string into the field's value."""
    if f.metadata["parse"] is not None:
        return f.metadata["parse"]
    if f.metadata["items"] is not None:
        return f.metadata["items"]
    default = default_of(f)
    if isinstance(default, bool):
        return str2bool
    return str if default is None else type(default)


class _ListAction(argparse.Action):
    """Items after the flag; the flag repeated adds more; the first use replaces the default (or the file's list)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, _SEEN_LISTS, set())
        current = list(getattr(namespace, self.dest)) if self.dest in seen else []
        setattr(namespace, _SEEN_LISTS, seen | {self.dest})
        setattr(namespace, self.dest, current + list(values))


def add_options(parser: argparse.ArgumentParser, schema) -> None:
    """One flag per :func:`cli_fields` field of ``schema``."""
    for f in cli_fields(schema):
        parse = value_parser(f)
        kwargs: dict[str, Any] = {"default": default_of(f), "help": f.metadata["help"], "type": parse}
        if f.metadata["items"] is not None:
            kwargs.update(nargs="*", action=_ListAction)
        elif parse is str2bool:
            kwargs.update(nargs="?", const=True)
        if f.metadata["choices"] is not None:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)


def _file_value(f: dataclasses.Field, value, path) -> Any:
    parse = value_parser(f)
    try:
        if f.metadata["items"] is not None:
            if not isinstance(value, list):
                raise TypeError("expected a list")
            return [parse(v) for v in value]
        if parse is str2bool:
            if not isinstance(value, bool):
                raise TypeError("expected true/false")
            return value
        if value is None:
            return None
        if parse is int and isinstance(value, float) and value != int(value):
            raise TypeError("expected an integer")
        return parse(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"{path}: option {f.name!r} has a wrong value {value!r}: {exc}") from None


def read_options_file(schema, path) -> dict:
    """The options a YAML file sets, each checked against ``schema`` (unknown key, type, choices: a ConfigError
    naming the file and key)."""
    from omegaconf import OmegaConf

    from ldm.util import load_config

    cfg = OmegaConf.to_container(load_config(path), resolve=True)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    valid = {f.name: f for f in cli_fields(schema)}
    out = {}
    for key, value in cfg.items():
        if key not in valid:
            raise ConfigError(f"{path}: unknown option {key!r} (valid: {', '.join(sorted(valid))})")
        out[key] = _file_value(valid[key], value, path)
        choices = valid[key].metadata["choices"]
        if choices is not None and out[key] is not None and out[key] not in choices:
            raise ConfigError(f"{path}: option {key!r} is {value!r}; choose from {', '.join(map(str, choices))}")
    return out


def check_choices(opts, source: str | None = None) -> None:
    """Every field with choices holds one of them (for options built in code; the parser checks its own input)."""
    source = source or type(opts).__name__
    for f in dataclasses.fields(opts):
        choices, value = f.metadata.get("choices"), getattr(opts, f.name)
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(
                f"{source}: option {f.name!r} is {value!r}; choose from {', '.join(str(c) for c in choices)}"
            )


def given_on_command_line(parser: Parser, argv) -> set:
    """Names of the options the command line sets explicitly (argparse skips defaults for names already present)."""
    unset = object()
    names = {a.dest for a in parser._actions if a.dest != "help"}
    probe = argparse.Namespace(**dict.fromkeys(names, unset))
    parsed, _ = parser.parse_known_args(argv, namespace=probe)
    return {name for name in names if getattr(parsed, name) is not unset}


def parse_over_file(parser: Parser, argv, file_values: dict, drop: tuple = ()) -> tuple[dict, set]:
    """Parse ``argv`` with ``file_values`` as the defaults; returns (option values without ``drop`` and
    ``--debug``, names given on the command line)."""
    parser.set_defaults(**file_values)
    explicit = given_on_command_line(parser, argv)
    args = vars(parser.parse_args(argv))
    values = {k: v for k, v in args.items() if k not in (*drop, "debug", _SEEN_LISTS)}
    return values, explicit
