"""A non-editable install carries the bundled model configs and tokenizer files (issue 26, defect 2).

``pip install .`` (not ``-e``) of a copy of the package into a scratch folder, then, from another working directory
with only that copy importable: ``--version 2.1``'s config, the training default, a recipe's ``model_config`` (the
old ``configs/...`` spelling of a user's recipe included) and a tiny config resolve to files inside the installed
package, and the tokenizer loads its vocabulary. ``--no-deps --no-build-isolation`` keeps it offline: the
dependencies are the test venv's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
from pathlib import Path

import ldm
from ldm.io.model_config import find_config_file, resolve_model_config
from ldm.tokenizer import CLIPTokenizer
from ldm.train.options import DEFAULT_MODEL_CONFIG, parse_options
from ldm.util import config_for_version

package = Path(ldm.__file__).parent
assert package.parent == Path(sys.argv[1]).resolve(), ldm.__file__  # the installed copy, not the repository's
found = {
    "version 2.1": config_for_version("2.1"),
    "default": find_config_file(DEFAULT_MODEL_CONFIG),
    "old spelling": find_config_file("configs/v1-inference.yaml"),
    "tiny": find_config_file("tiny/sd2-tiny.yaml"),
    "recipe": Path(parse_options(["--train_config", sys.argv[2]]).model_config),
    "recipe, old spelling": Path(parse_options(["--train_config", sys.argv[3]]).model_config),
}
for what, path in found.items():
    assert path.is_file() and path.is_relative_to(package / "configs"), (what, path)
assert resolve_model_config(version="2.1").config["model"]["params"]["parameterization"] == "eps"
assert CLIPTokenizer.for_family("sd2").encode("a photo")[:2]
print("ok", sorted(found))
"""


def test_non_editable_install_finds_configs_and_tokenizer(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copytree(ROOT / "ldm", source / "ldm", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
    run = subprocess.run([*install, str(target), str(source)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (target / "ldm" / "__editable__").exists() and (target / "ldm" / "configs").is_dir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    recipe = ROOT / "configs/train/train_config_lora_v1.yaml"
    old_recipe = elsewhere / "my_recipe.yaml"  # a user's recipe written for the layout before configs moved
    old_recipe.write_text("model_config: configs/v2-inference-v.yaml\nlora_rank: 8\n", encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-c", CHECK, str(target), str(recipe), str(old_recipe)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-3000:]
