"""The import layers of CONTRIBUTING.md hold: no module imports a later layer, and the MindSpore-free modules (option
parsing, adapter files, model-config resolution) do not start MindSpore."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LDM = Path(__file__).resolve().parents[1] / "ldm"

# package prefix -> imports it must not make at module level
FORBIDDEN = {
    "ldm.names": ("ldm.", "mindspore"),
    "ldm.cli": ("ldm.", "mindspore"),
    "ldm.io.errors": ("ldm.", "mindspore"),
    "ldm.models": ("ldm.io", "ldm.lora", "ldm.train", "ldm.samplers", "ldm.pipeline", "ldm.generate"),
    "ldm.io": ("ldm.lora", "ldm.train", "ldm.samplers", "ldm.pipeline", "ldm.generate", "ldm.models.diffusion"),
    "ldm.lora": ("ldm.train", "ldm.samplers", "ldm.pipeline", "ldm.generate"),
    "ldm.lora.adapter": ("mindspore", "ldm.models", "ldm.lora.layers", "ldm.lora.network"),
    "ldm.train.options": ("mindspore", "ldm.train.trainer", "ldm.models"),
    "ldm.memory_plan": ("mindspore", "ldm.io", "ldm.models", "ldm.lora", "ldm.train", "ldm.generate"),
    "ldm.compile_cache": ("mindspore", "ldm.io", "ldm.models", "ldm.lora", "ldm.train", "ldm.generate"),
}


def _module_imports(path: Path) -> list[str]:
    """Names imported at module level (function-level lazy imports are allowed)."""
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def _modules():
    for path in sorted(LDM.rglob("*.py")):
        parts = path.relative_to(LDM.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


@pytest.mark.parametrize("name, path", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_no_import_of_a_later_layer(name, path):
    for prefix, banned in FORBIDDEN.items():
        if name == prefix or name.startswith(prefix + "."):
            bad = [imp for imp in _module_imports(path) if imp.startswith(banned) and not imp.startswith(name)]
            assert not bad, f"{name} imports {bad} (layer rule for {prefix})"


def test_light_modules_do_not_start_mindspore():
    code = (
        "import sys, ldm.names, ldm.cli, ldm.io.model_config, ldm.lora.adapter, ldm.lora.interop, ldm.lora.merge, "
        "ldm.lora.cli, ldm.train.options, ldm.generate, ldm.memory_plan, ldm.compile_cache; "
        "print('mindspore' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
