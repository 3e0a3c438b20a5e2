"""The compile cache's folder key (``ldm.compile_cache``): every option that shapes a graph or the order of compiles
changes it, outputs do not; the switch, PyNative and a folder in use leave MindSpore's cache off.

MindSpore reloads cached graphs by compile order and checks nothing of the graph itself, so a key that misses a
graph-shaping input runs a stale graph; the CLI end to end (a warm run equal to a cold one, a new rank in a new
folder) is ``tests/test_compile_cache.py``.
"""

from __future__ import annotations

import dataclasses
import fcntl

import pytest

from ldm.compile_cache import KEEP_VAR, ROOT_VAR, cache_key, compile_cache_root, keep_count, use_compile_cache
from ldm.generate import NOT_IN_GRAPH_KEY, graph_inputs
from ldm.generate_options import GenerateOptions
from ldm.train.options import TrainOptions

BASE = TrainOptions(data_path="data", output_path="out")
EXTRA = {"model_config": {"unet": {"channels": 32}}}


@pytest.mark.parametrize(
    "change",
    [
        {"lora_rank": 8},
        {"image_size": 64},
        {"train_batch_size": 2},
        {"precision": "fp16"},
        {"lora_targets": "attn_mlp"},
        {"lora_type": "loha"},
        {"lora_ft_text_encoder": True},
        {"mode": 1},
        {"jit_level": "O1"},
        {"use_recompute": True},
        {"gradient_accumulation_steps": 2},
        {"enable_bucket": True},
    ],
)
def test_graph_shaping_options_change_the_key(change):
    assert cache_key("train", dataclasses.replace(BASE, **change), EXTRA) != cache_key("train", BASE, EXTRA)


def test_outputs_and_the_switch_keep_the_key():
    same = dataclasses.replace(BASE, output_path="elsewhere", compile_cache=False, log_interval=1)
    assert cache_key("train", same, EXTRA) == cache_key("train", BASE, EXTRA)


def test_model_config_job_version_and_source_change_the_key(monkeypatch):
    key = cache_key("train", BASE, EXTRA)
    assert cache_key("train", BASE, {"model_config": {"unet": {"channels": 64}}}) != key
    assert cache_key("generate", BASE, EXTRA) != key
    monkeypatch.setenv("MS_WORKER_NUM", "2")
    assert cache_key("train", BASE, EXTRA) != key
    monkeypatch.delenv("MS_WORKER_NUM")
    monkeypatch.setattr("ldm.compile_cache.importlib.metadata.version", lambda name: "9.9.9")
    assert cache_key("train", BASE, EXTRA) != key
    monkeypatch.undo()
    monkeypatch.setattr("ldm.compile_cache.source_digest", lambda: "edited")
    assert cache_key("train", BASE, EXTRA) != key


def _generation_key(**values) -> str:
    job = GenerateOptions(config="ldm/configs/tiny/sd2-tiny.yaml", **values)
    return cache_key("generate", job, graph_inputs(job), NOT_IN_GRAPH_KEY)


def test_generation_key_follows_prompt_shapes_not_texts_or_seeds():
    key = _generation_key(prompts=["a red fox"])
    assert _generation_key(prompts=["a blue square"]) == key
    assert _generation_key(prompts=["a fox " * 60]) != key  # two 75-token chunks: another text-encoder shape
    assert _generation_key(prompts=["a (red:1.3) fox"], prompt_weighting=True) != key  # the weighted path
    assert _generation_key(prompts=["a red fox", "a red fox"]) != key
    assert _generation_key(prompts=["a red fox"], H=64) != key
    assert _generation_key(prompts=["a red fox"], sampler="euler") != key
    assert _generation_key(prompts=["a red fox"], n_samples=2) != key
    # numpy draws the noise from the seed and feeds it to the graphs; more batches repeat the same shapes
    assert _generation_key(prompts=["a red fox"], seed=7, n_iter=5, seed_per_prompt=True) == key


def test_off_switch_and_pynative_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(ROOT_VAR, str(tmp_path / "cc"))
    assert use_compile_cache(False, 0, "train", BASE, EXTRA) is None
    assert use_compile_cache(True, 1, "train", BASE, EXTRA) is None
    assert not (tmp_path / "cc").exists()


def test_a_folder_in_use_is_left_alone(tmp_path, monkeypatch):
    """A second process with the same key (simulated by holding the rank's lock) compiles without the cache."""
    monkeypatch.setenv(ROOT_VAR, str(tmp_path / "cc"))
    folder = compile_cache_root() / f"train-{cache_key('train', BASE, EXTRA)}"
    folder.mkdir(parents=True)
    with open(folder / ".lock-rank0", "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert use_compile_cache(True, 0, "train", BASE, EXTRA) is None
    assert not (folder / "rank_0").exists()


def test_bucketed_runs_key_the_images(tmp_path):
    """With buckets the shapes, and so the compile order, follow the images: a new image is a new key."""
    from ldm.train.options import bucket_spec
    from ldm.train.trainer import graph_inputs

    (tmp_path / "a.png").write_bytes(b"1")
    opts = dataclasses.replace(BASE, data_path=str(tmp_path), enable_bucket=True)
    before = graph_inputs(opts, EXTRA["model_config"], bucket_spec(opts))
    (tmp_path / "b.png").write_bytes(b"22")
    assert graph_inputs(opts, EXTRA["model_config"], bucket_spec(opts)) != before
    plain = dataclasses.replace(BASE, data_path=str(tmp_path))
    assert "files" not in graph_inputs(plain, EXTRA["model_config"], None)


def test_least_recently_used_folders_beyond_the_limit_are_deleted_unless_held(tmp_path, monkeypatch):
    """Five old configuration folders, a limit of 3: a run keeps its own and the two most recently used others, and
    leaves an old folder another run holds (its rank lock taken)."""
    import os

    monkeypatch.setenv(ROOT_VAR, str(tmp_path / "cc"))
    monkeypatch.setenv(KEEP_VAR, "3")
    root = compile_cache_root()
    for age, name in enumerate(["train-a", "train-b", "train-c", "train-d", "train-e"]):
        (root / name / "rank_0").mkdir(parents=True)
        (root / name / ".lock-rank0").touch()
        os.utime(root / name, (1000 - age, 1000 - age))  # train-a the most recently used
    with open(root / "train-e" / ".lock-rank0", "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        messages = []
        folder = use_compile_cache(True, 0, "train", BASE, EXTRA, log=messages.append)
    assert sorted(p.name for p in root.iterdir()) == sorted(["train-a", "train-b", "train-e", folder.name])
    assert any("deleted 2 least recently used" in m for m in messages)


def test_a_bad_keep_count_is_named(monkeypatch):
    monkeypatch.setenv(KEEP_VAR, "many")
    with pytest.raises(ValueError, match="LDM_COMPILE_CACHE_KEEP='many'"):
        keep_count()
