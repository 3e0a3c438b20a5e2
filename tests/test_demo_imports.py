"""The demo's command-line tools run with only the runtime dependencies that `make demo` installs.

`make demo` installs ``pip install -e .`` (no test extras), so training, generation, FID and CLIP score must not import
torch, diffusers, transformers, peft, torchmetrics or scikit-image. This test runs the CLIs the demo uses on tiny
inputs in subprocesses where every installed package outside ``ldm``'s runtime dependency closure is unimportable
(a ``sitecustomize`` meta-path hook raising ``ModuleNotFoundError``, as a missing package does), and records every
blocked import attempt: each CLI must succeed and must not even try to import a PyTorch-family package.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ldm.data.synthetic import make_shapes_dataset
from ldm.env import set_seed
from ldm.io.checkpoint import write_state_dict
from ldm.io.model_io import save_model
from ldm.metrics.clip import CLIPConfig, CLIPModel
from ldm.metrics.fid_weights import MissingWeightsError
from ldm.metrics.fid_weights import resolve as resolve_fid_weights
from ldm.models.diffusion import build_model_from_config
from ldm.util import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[1]
PYTORCH_FAMILY = ("torch", "torchvision", "diffusers", "transformers", "peft", "torchmetrics", "skimage")
# Installed by `python -m venv` itself, so present in a `make demo` environment too.
VENV_BASELINE = ("pip", "setuptools", "wheel")
TIMEOUT = 900

BLOCKER = textwrap.dedent(
    '''
    """Test hook: the modules named in LDM_BLOCKED_MODULES cannot be imported; attempts are appended to a log."""
    import os
    import sys

    _BLOCKED = frozenset(os.environ["LDM_BLOCKED_MODULES"].split(","))
    _LOG = os.environ["LDM_BLOCKED_LOG"]


    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top not in _BLOCKED:
                return None
            with open(_LOG, "a", encoding="utf-8") as log:
                log.write(f"{os.path.basename(sys.argv[0] or '-c')} {name}\\n")
            raise ModuleNotFoundError(f"No module named {top!r} (not a runtime dependency)", name=top)


    sys.meta_path.insert(0, _Blocker())
    '''
)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_distributions() -> set[str]:
    """``ldm`` and everything its requirements pull in, without extras (what ``pip install -e .`` installs)."""
    wanted, seen = ["ldm"], set()
    while wanted:
        name = _canonical(wanted.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requirements:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                wanted.append(req.name)
    return seen | set(VENV_BASELINE)


def blocked_modules() -> set[str]:
    """Top-level modules of installed distributions outside the runtime closure."""
    allowed = runtime_distributions()
    blocked = set()
    for module, dists in md.packages_distributions().items():
        if module.isidentifier() and not any(_canonical(d) in allowed for d in dists):
            blocked.add(module)
    return blocked


def _tiny_clip_folder(folder: Path) -> None:
    """A random tiny CLIP saved as a Hugging Face folder (config.json + model.safetensors), built without torch."""
    cfg = CLIPConfig(
        image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, vision_mlp=64,
        text_width=32, text_layers=1, text_heads=2, text_mlp=64, projection_dim=16,
    )  # fmt: skip
    model = CLIPModel(cfg)
    folder.mkdir()
    write_state_dict(folder / "model.safetensors", {n: p.asnumpy() for n, p in model.parameters_and_names()})
    hf_config = {
        "projection_dim": cfg.projection_dim,
        "text_config": {
            "hidden_size": cfg.text_width, "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads, "intermediate_size": cfg.text_mlp,
        },
        "vision_config": {
            "image_size": cfg.image_size, "patch_size": cfg.patch_size, "hidden_size": cfg.vision_width,
            "num_hidden_layers": cfg.vision_layers, "num_attention_heads": cfg.vision_heads,
            "intermediate_size": cfg.vision_mlp,
        },
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(hf_config))


@pytest.fixture
def runtime_env(tmp_path):
    """Environment for subprocesses that can import the runtime dependencies only; returns (env, attempt log)."""
    hook = tmp_path / "runtime_only"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BLOCKER)
    log = hook / "blocked_imports.log"
    log.touch()
    blocked = blocked_modules()
    assert _installed_pytorch_family(), "the test environment has none of the packages to block"
    assert set(_installed_pytorch_family()) <= blocked
    path = os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "LDM_BLOCKED_MODULES": ",".join(sorted(blocked))}
    return {**env, "LDM_BLOCKED_LOG": str(log)}, log


def _installed_pytorch_family() -> list[str]:
    return [name for name in PYTORCH_FAMILY if importlib.util.find_spec(name) is not None]


def _attempts(log: Path) -> list[str]:
    """Blocked import attempts of PyTorch-family modules, as ``<script> <module>`` lines."""
    return [line for line in log.read_text().splitlines() if line.split()[1].partition(".")[0] in PYTORCH_FAMILY]


def _run(runtime_env, script: str, *args) -> None:
    """Run a CLI of the repository under the import blocker; it must succeed without trying PyTorch packages."""
    env, log = runtime_env
    cmd = [sys.executable, script, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"
    assert _attempts(log) == [], f"{script} tried to import a PyTorch-family package"


def test_blocker_makes_pytorch_unimportable(runtime_env):
    env, log = runtime_env
    installed = _installed_pytorch_family()
    for name in installed:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, name
    assert len(_attempts(log)) == len(installed)  # each attempt is recorded


def test_demo_clis_run_without_pytorch_packages(runtime_env, tmp_path):
    set_seed(0)
    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    base = tmp_path / "base.safetensors"
    save_model(build_model_from_config(config), base, config=config)
    data = make_shapes_dataset(tmp_path / "data", count=8, size=32)
    _tiny_clip_folder(tmp_path / "clip")

    train_out = tmp_path / "train"
    _run(
        runtime_env, "examples/stable_diffusion_v2/train_text_to_image.py",
        "--train_config", "configs/train/train_config_lora_tiny.yaml", "--data_path", data,
        "--pretrained_model_path", base, "--output_path", train_out, "--max_train_steps", 2,
    )  # fmt: skip
    adapter = train_out / "ckpt/lora-000002.safetensors"
    assert adapter.is_file()

    gen_out = tmp_path / "gen"
    _run(
        runtime_env, "examples/stable_diffusion_v2/text_to_image.py", "--config", CONFIG_DIR / "tiny/sd2-tiny.yaml",
        "--ckpt_path", base, "--use_lora", "True", "--lora_ckpt_path", adapter, "--prompt", "a red circle",
        "--sampling_steps", 2, "--n_iter", 2, "--H", 32, "--W", 32, "--output_path", gen_out,
    )  # fmt: skip
    samples = gen_out / "samples"
    assert len(list(samples.glob("*.png"))) == 2

    clip_json = tmp_path / "clip.json"
    _run(
        runtime_env, "tools/eval/eval_clip_score.py", "--image_dir", samples, "--prompts", "a red circle",
        "--model_dir", tmp_path / "clip", "--output_json", clip_json, "--quiet",
    )  # fmt: skip
    assert "clip_score" in json.loads(clip_json.read_text())

    try:
        resolve_fid_weights()
    except MissingWeightsError as exc:
        if os.environ.get("LDM_REQUIRE_REAL_DATA"):
            raise
        pytest.skip(f"FID step not run (training, generation and CLIP score passed): {exc}")
    fid_json = tmp_path / "fid.json"
    _run(
        runtime_env, "tools/eval/eval_fid.py", "--real_dir", data / "images", "--gen_dir", samples,
        "--output_json", fid_json, "--quiet",
    )  # fmt: skip
    assert "fid" in json.loads(fid_json.read_text())
