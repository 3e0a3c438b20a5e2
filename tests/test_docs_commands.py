"""Every shell command in README.md and docs/*.md runs as written, so a stale path or flag fails CI.

Each fenced ``bash``/``sh`` block is split into commands (continuation lines joined, comments dropped). For every
command: the program exists (a script of this repository, ``python -m`` one of our modules, a ``make`` target); every
path it names inside a shipped folder (``configs/``, ``models/``, ...) exists; and every ``--flag`` is one its ``-h``
lists (``-h`` answers without starting MindSpore). Paths elsewhere (``path/to/...``, ``output/...``) are the user's
files or the outputs of earlier commands and are not checked. Long jobs (training, ``make demo``) are checked this
way only; a command whose inputs all ship and that takes seconds (a conversion of the tiny SD) is run for real in a
scratch checkout. The data-parallel command is also run for real, by ``tests/test_launch.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHIPPED = ("configs", "models", "tools", "examples", "scripts", "benchmarks", "ldm", "tests", "docs")
SHELLS = ("bash", "sh", "shell", "console")
PYTHONS = ("python", "python3", ".venv/bin/python")
# Modules run for real when every input they name ships: each takes seconds on the tiny SD.
QUICK_MODULES = ("ldm.convert",)
README_MAX_LINES = 220


def _blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, text) of each fenced shell block of a Markdown page."""
    out, lines = [], page.read_text(encoding="utf-8").splitlines()
    start = lang = None
    for i, line in enumerate(lines):
        fence = re.match(r"^\s*```\s*(\S*)", line)
        if fence and start is None:
            start, lang = i, fence.group(1)
        elif fence:
            if lang in SHELLS:
                out.append((start + 2, "\n".join(lines[start + 1 : i])))
            start = lang = None
    return out


def _commands(page: Path) -> list[tuple[str, list[str]]]:
    """(``page:line``, words) of each command in the page's shell blocks, up to a pipe."""
    found = []
    for first, block in _blocks(page):
        logical, at = "", first
        for n, line in enumerate(block.split("\n"), start=first):
            if not logical:
                at = n
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            words = shlex.split(logical + line, comments=True)
            logical = ""
            if "|" in words:
                words = words[: words.index("|")]
            if words and words[0] == "time":
                words = words[1:]
            if words:
                found.append((f"{page.relative_to(ROOT)}:{at}", words))
    return found


ALL = [c for page in PAGES for c in _commands(page)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@cache
def _help(program: tuple[str, ...]) -> str:
    """The ``-h`` text of a Python program (a script path or ``-m module``, with a subcommand if any)."""
    run = subprocess.run(
        [sys.executable, *program, "-h"], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=120
    )
    assert run.returncode == 0, f"{' '.join(program)} -h failed:\n{run.stderr[-2000:]}"
    return run.stdout


def _split_python(words: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """A Python command's program (script or ``-m module``, plus its subcommand) and its remaining arguments."""
    if words[0] == "-m":
        program, args = tuple(words[:2]), words[2:]
    else:
        program, args = (words[0],), words[1:]
    subcommands = re.search(r"\{([\w,-]+)\}", _help(program).split("\n\n")[0])
    if args and subcommands and args[0] in subcommands.group(1).split(","):
        program, args = (*program, args[0]), args[1:]
    return program, args


def _check_flags(where: str, program: tuple[str, ...], args: list[str]) -> None:
    text = _help(program)
    for word in args:
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{where}: {flag} not in {program} -h"


def _check_paths(where: str, words: list[str]) -> None:
    for word in words:
        value = word.split("=", 1)[-1]
        if value.split("/", 1)[0] in SHIPPED and "/" in value:
            assert list(ROOT.glob(value)) if "*" in value else (ROOT / value).exists(), f"{where}: no {value}"


def _python_command(where: str, words: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """Check a ``python ...`` command; returns its program and arguments, or None for pytest."""
    if words[:2] == ["-m", "pytest"]:
        _check_paths(where, words[2:])
        return None
    if words[0] != "-m":
        assert (ROOT / words[0]).is_file(), f"{where}: no script {words[0]}"
    program, args = _split_python(words)
    _check_flags(where, program, args)
    _check_paths(where, words)
    return program, args


def _check(where: str, words: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """Check one documented command by its program, paths and flags; returns a Python program and its arguments."""
    head, rest = words[0], words[1:]
    if head in PYTHONS:
        return _python_command(where, rest)
    if head == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert rest and all(t in targets for t in rest), f"{where}: make {rest} is not a target of the Makefile"
    elif head == "scripts/run_train_parallel.sh":
        assert rest and rest[0].isdigit(), f"{where}: the launcher takes NPROC first"
        _python_command(where, ["examples/stable_diffusion_v2/train_text_to_image.py", *rest[1:]])
    elif head == "msrun":
        script = next((i for i, w in enumerate(rest) if w.endswith(".py")), None)
        assert script is not None, f"{where}: msrun without a training script"
        assert all(w.startswith("--") for w in rest[:script]), f"{where}: msrun options must come first"
        _python_command(where, rest[script:])
    elif head == "pip":
        assert rest[:1] == ["install"], f"{where}: only 'pip install' is documented"
    else:
        pytest.fail(f"{where}: unknown program {head!r}: teach tests/test_docs_commands.py how to check it")
    return None


@pytest.mark.parametrize("where, words", ALL, ids=[w for w, _ in ALL])
def test_documented_command_runs_as_written(where, words, tmp_path):
    checked = _check(where, words)
    if checked is None:
        return
    program, args = checked
    paths = [a for a in args if not a.startswith("-") and "/" in a]
    quick = program[0] == "-m" and program[1] in QUICK_MODULES
    if not (quick and paths and all(p.split("/", 1)[0] in SHIPPED + ("output",) for p in paths)):
        return
    for name in SHIPPED:  # a scratch checkout: outputs land under tmp_path, never in the repository
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    run = subprocess.run(
        [sys.executable, *words[1:]], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300
    )
    assert run.returncode == 0, f"{where}: {' '.join(words)}\n{run.stderr[-3000:]}"


def test_pages_have_commands_and_links_resolve():
    """The pages exist, hold commands, and every relative link or image points at a file of the repository."""
    assert len(ALL) > 10 and {"README.md"} <= {w.split(":")[0] for w, _ in ALL}
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not re.match(r"\w+://", target):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: link to missing {target}"


def test_pages_do_not_name_the_deprecated_lora_module():
    """``ldm.lora_tools`` is a deprecated alias of ``ldm.lora``: users are shown the module that stays."""
    for page in PAGES:
        assert "ldm.lora_tools" not in page.read_text(encoding="utf-8"), page.relative_to(ROOT)


def test_readme_is_a_short_guide():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; depth goes to docs/"
