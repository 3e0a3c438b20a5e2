"""The command-line convention every entry point follows (plain Python: no MindSpore import).

- Flags are snake_case as in mindone (``--allow_pickle``); the kebab spelling (``--allow-pickle``) is accepted as an
  alias, so both read the same option.
- Bad input is one line ``error: <message naming the culprit>`` on stderr and exit status 2; ``--debug`` shows the
  Python traceback instead. Usage errors from argparse are one line too.
- Booleans given as values (``--use_lora True``) go through :func:`str2bool`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

# Errors that mean "bad input" (files, keys, values); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, OSError)


def str2bool(value) -> bool:
    """``True``/``False`` from ``1/true/yes`` or ``0/false/no`` (any case); argparse type for boolean values."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _kebab_aliases(names) -> list:
    return [n.replace("_", "-") for n in names if n.startswith("--") and "_" in n]


def _with_aliases(container):
    """Make ``container.add_argument`` also register the kebab spelling of each snake_case flag."""
    plain = container.add_argument

    def add_argument(*names, **kwargs):
        return plain(*names, *_kebab_aliases(names), **kwargs)

    container.add_argument = add_argument
    return container


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` with the house convention: kebab aliases of snake_case flags (groups included),
    one-line usage errors (exit 2) and a ``--debug`` flag on every (sub)parser."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _with_aliases(self)
        self.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the Python traceback of an error"
        )

    def add_argument_group(self, *args, **kwargs):
        return _with_aliases(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs):
        return _with_aliases(super().add_mutually_exclusive_group(**kwargs))

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def add_allow_pickle(parser, what: str = "checkpoints") -> None:
    """The ``--allow_pickle`` flag every reader of PyTorch pickles shares."""
    parser.add_argument(
        "--allow_pickle",
        action="store_true",
        help=f"read PyTorch pickle {what} (.ckpt/.pt/.bin) with a restricted unpickler that only rebuilds tensors; "
        "only for files you trust",
    )


def fail(exc: BaseException) -> int:
    """Print ``error: <message>`` for a bad-input exception (a KeyError without its quotes); returns 2."""
    text = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).strip()
    print(f"error: {text or type(exc).__name__}", file=sys.stderr)
    return 2


def call(body: Callable[[], int | None], debug: bool = False) -> int:
    """Run ``body()``: bad input gives one ``error:`` line and 2 (the traceback with ``debug``); ``SystemExit``
    from argparse (``-h``, usage errors) becomes its status."""
    try:
        return int(body() or 0)
    except SystemExit as exc:
        return int(exc.code or 0)
    except USER_ERRORS as exc:
        if debug:
            raise
        return fail(exc)


def debug_requested(argv=None) -> bool:
    """Whether ``--debug`` is among the arguments (for entry points that parse in several steps)."""
    return "--debug" in (sys.argv[1:] if argv is None else list(argv))


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None], argv=None) -> int:
    """Parse ``argv`` with ``parser`` and :func:`call` ``body(args)``."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return call(lambda: body(args), debug=getattr(args, "debug", False))
