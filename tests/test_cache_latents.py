"""Cached latents and text embeddings (``cache_latents`` / ``cache_text_embeddings``, :mod:`ldm.data.cache`).

Fast checks: the options refuse random crop and a trained text encoder; a cached sample takes the flip and caption
the uncached source draws; each rank caches only the records it visits; with the tiny model the step's inputs
(posterior sample, text context) equal the uncached ones; releasing the encoders removes their weights. The slow
check trains through the CLI with and without the cache, and resumes a cached run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from ldm.data import BucketSpec, CaptionRules, ImageCaptionSource, ShardedSampler, build_cache, build_dataset
from ldm.data.cache import CacheEncoders
from ldm.data.cache_networks import ReleasedNetwork, cache_encoders, release_cached_networks
from ldm.data.synthetic import make_mixed_aspect_folder, make_shapes_dataset
from ldm.env import set_seed
from ldm.io.checkpoint import read_state_dict
from ldm.io.model_io import save_model
from ldm.models.diffusion import build_model_from_config
from ldm.train.losses import CachedLatents, LatentEncoder, NoiseSampler
from ldm.train.options import TrainOptions, parse_options, resolve_cache_options
from ldm.util import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples/stable_diffusion_v2/train_text_to_image.py"
TINY = ROOT / "configs/train/train_config_lora_tiny.yaml"


def stub_tokenizer(texts):
    """int32 [B, 77]: the caption's characters (0 for an empty caption): distinct captions, distinct rows."""
    out = np.zeros((len(texts), 77), np.int32)
    for row, text in zip(out, texts):
        codes = [ord(c) for c in text][:77]
        row[: len(codes)] = codes
    return out


def make_multicaption_folder(root: Path, rng, n: int = 6) -> Path:
    """Asymmetric random images (a flip changes them) with two captions each, diffusers layout."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": [f"image {i} first", f"image {i} second"]}) + "\n")
    return root


def fake_encoders() -> CacheEncoders:
    """Deterministic stand-ins for the VAE (image -> 2x image + 1) and the text encoder (tokens as floats)."""
    return CacheEncoders(
        images=lambda batch: 2.0 * batch + 1.0,
        texts=lambda captions: stub_tokenizer(captions)[:, :, None].astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "options, turned_off, named",
    [
        ({"cache_latents": True, "random_crop": True}, "cache_latents", "'random_crop'"),
        (
            {"cache_text_embeddings": True, "lora_ft_text_encoder": True},
            "cache_text_embeddings",
            "'lora_ft_text_encoder'",
        ),
    ],
)
def test_uncacheable_inputs_turn_the_cache_off_with_a_warning(options, turned_off, named, caplog):
    """A cache whose inputs change between visits is turned off, with a warning naming both options, when parsed and
    when options are built in code; the other options are kept, and each cache option alone stays on."""
    argv = ["--data_path", "d"] + [arg for key, value in options.items() for arg in (f"--{key}", str(value))]
    builders = [
        (lambda: parse_options(argv), "command line"),
        (lambda: resolve_cache_options(TrainOptions(**options)), ""),
    ]
    for build, source in builders:
        opts = build()
        assert getattr(opts, turned_off) is False
        assert all(getattr(opts, key) is True for key in options if key != turned_off)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and named in warnings[0] and f"'{turned_off}' is turned off" in warnings[0], warnings
        assert warnings[0].startswith(source or "TrainOptions"), warnings
        caplog.clear()
    assert getattr(parse_options(["--data_path", "d", f"--{turned_off}", "True"]), turned_off) is True
    assert not caplog.records


def test_cli_names_the_yaml_and_both_options_in_its_warning(tmp_path):
    """The CLI warns before MindSpore starts, naming the YAML and both options, then goes on (here it stops at the
    missing data set, which is checked next)."""
    config = tmp_path / "train.yaml"
    config.write_text("cache_latents: true\nrandom_crop: true\n")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--train_config", str(config), "--data_path", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and str(config) in warnings[0] and "'random_crop'" in warnings[0], run.stderr[-2000:]
    assert "'cache_latents' is turned off" in warnings[0], warnings
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1 and "no such folder" in errors[0], run.stderr[-2000:]
    assert not (tmp_path / "output").exists()


# ----------------------------------------------------------------------------------------------- cache contents
def test_cached_samples_take_the_drawn_flip_and_caption(tmp_path, rng):
    """Over three epochs every cached sample equals the stand-in encoders applied to what the uncached source
    gives for that sample id: the mirrored image exactly when the source mirrors it, the caption (or "") it draws."""
    root = make_multicaption_folder(tmp_path / "d", rng)
    source = ImageCaptionSource(root, stub_tokenizer, image_size=8, flip=True, caption_dropout=0.3, seed=5)
    sampler = ShardedSampler(len(source), batch_size=2, seed=5, num_epochs=3)
    encoders = fake_encoders()
    cached = build_cache(source, iter(sampler), encoders, progress=False)
    assert cached.column_names == ("moments", "context")
    assert np.stack(cached.moments).shape == (6, 2, 3, 8, 8)  # 6 records x 2 flips
    assert set(cached.context_rows) == {f"image {i} {w}" for i in range(6) for w in ("first", "second")} | {""}
    mirrored, captions = set(), set()
    for sample_id in sampler:
        moments, context = cached[sample_id]
        np.testing.assert_array_equal(moments, encoders.images(source.image(sample_id)[None])[0])
        text = source.caption(sample_id)
        np.testing.assert_array_equal(context, encoders.texts([text])[0])
        mirrored.add(source.mirrored(sample_id))
        captions.add(text)
    assert mirrored == {False, True}  # both flips were drawn, and they differ:
    assert not np.array_equal(np.stack(cached.moments)[:, 0], np.stack(cached.moments)[:, 1])
    assert "" in captions and len(captions) > 6


def test_each_rank_caches_only_its_records(tmp_path, rng):
    """One epoch over 2 ranks: each rank encodes the records of its own shard, not the others."""
    root = make_multicaption_folder(tmp_path / "d", rng, n=8)
    source = ImageCaptionSource(root, stub_tokenizer, image_size=8)
    shards = []
    for rank in (0, 1):
        sampler = ShardedSampler(len(source), batch_size=2, seed=1, rank=rank, world_size=2)
        cached = build_cache(source, iter(sampler), CacheEncoders(images=fake_encoders().images), progress=False)
        visited = {sample_id % len(source) for sample_id in sampler}
        assert set(cached.latent_rows) == visited and len(visited) == 4
        assert cached.column_names == ("moments", "tokens") and np.stack(cached.moments).shape[:2] == (4, 1)
        shards.append(visited)
    assert not shards[0] & shards[1]


def _assert_step_inputs_equal(model, plain, cached) -> int:
    """Every batch's posterior sample (same noise) and text context from ``cached`` equal ``plain``'s; the count."""
    encode, from_cache = LatentEncoder(model), CachedLatents(model)
    noise = NoiseSampler(0)
    batches = zip(plain.create_tuple_iterator(output_numpy=True), cached.create_tuple_iterator(output_numpy=True))
    count = 0
    for (images, tokens), (moments, contexts) in batches:
        post_noise = noise.normal((moments.shape[0], moments.shape[1] // 2, *moments.shape[2:]))
        want = encode(ms.Tensor(images), post_noise).asnumpy()
        got = from_cache(ms.Tensor(moments), post_noise).asnumpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
        want = model.get_learned_conditioning(ms.Tensor(tokens)).asnumpy()
        np.testing.assert_allclose(contexts, want, rtol=0, atol=1e-5 * np.abs(want).max())
        count += 1
    return count


def test_cached_step_inputs_equal_uncached(tmp_path):
    """The tiny model's posterior sample (same noise) and text context from the cache equal the uncached ones for
    every batch of two epochs with flips and caption dropout. Tolerance 1e-5 of the value range: the cache encodes
    one image (or caption) at a time, the uncached step a batch of two, which changes float32 summation order only."""
    set_seed(0)
    model = build_model_from_config(load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml"))
    data = make_shapes_dataset(tmp_path / "data", count=6, size=32)
    opts = TrainOptions(cache_latents=True, cache_text_embeddings=True)
    common = {"image_size": 32, "batch_size": 2, "seed": 3, "flip": True, "caption_dropout": 0.5, "num_epochs": 2}
    plain = build_dataset(data, model.tokenize, **common)
    cached = build_dataset(data, model.tokenize, **common, cache=cache_encoders(model, opts))
    assert _assert_step_inputs_equal(model, plain, cached) == 6


def test_bucketed_cache_equals_uncached(tmp_path):
    """The same with aspect-ratio buckets, a 3-times repeated folder and a caption prefix: every batch's cached
    moments have its bucket's latent shape and equal the uncached encode (same tolerance, same reason); each image is
    encoded once per flip although it appears three times per epoch."""
    set_seed(0)
    model = build_model_from_config(load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml"))
    sizes = [(48, 32), (50, 30), (32, 48), (30, 52), (32, 32)]
    data = make_mixed_aspect_folder(tmp_path / "data", sizes, repeats=3)
    opts = TrainOptions(cache_latents=True, cache_text_embeddings=True)
    common = {"image_size": 32, "batch_size": 2, "seed": 3, "flip": True, "caption_dropout": 0.3, "num_epochs": 2}
    common |= {"buckets": BucketSpec((32, 32), 16, 64, 8), "captions": CaptionRules(caption_prefix="a photo of")}
    plain = build_dataset(data, model.tokenize, **common)
    cached = build_dataset(data, model.tokenize, **common, cache=cache_encoders(model, opts))
    shapes = {tuple(m.shape[2:]) for (m, _) in cached.create_tuple_iterator(output_numpy=True)}
    assert shapes == {(12, 20), (20, 12), (16, 16)}  # 40x24, 24x40 and 32x32 pixels (H, W) at 2x downsampling
    # 3 buckets x 3 repeats: ceil(6/2) + ceil(6/2) + ceil(3/2) = 8 batches per epoch
    assert _assert_step_inputs_equal(model, plain, cached) == 16


def test_release_drops_the_encoders(tmp_path):
    """After caching, the VAE encoder and the text encoder hold no weights; the decoder stays for validation."""
    model = build_model_from_config(load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml"))
    before = {p.name for p in model.get_parameters()}
    opts = TrainOptions(cache_latents=True, cache_text_embeddings=True)
    release_cached_networks(model, opts, validating=True)
    after = {p.name for p in model.get_parameters()}
    gone = before - after
    released = ("first_stage_model.encoder.", "first_stage_model.quant_conv.", "cond_stage_model.")
    assert gone and all(name.startswith(released) for name in gone)
    assert not any(n.startswith("cond_stage_model.") for n in after)
    assert any(n.startswith("first_stage_model.decoder.") for n in after)
    assert isinstance(model.first_stage_model.encoder, ReleasedNetwork)
    with pytest.raises(RuntimeError, match="released"):
        model.encode_first_stage(ms.Tensor(np.zeros((1, 3, 32, 32), np.float32)))
    assert model.tokenize(["a"]).shape == (1, 77)  # the tokenizer stays: captions are still looked up by text


# ----------------------------------------------------------------------------------------------- training runs
def _train(setup, out: Path, *args: str):
    cmd = [sys.executable, str(SCRIPT), "--train_config", str(TINY), "--data_path", str(setup["data"])]
    cmd += ["--output_path", str(out), "--pretrained_model_path", str(setup["base"]), "--train_batch_size", "2"]
    cmd += ["--seed", "7", "--scheduler", "constant", "--warmup_steps", "0", "--start_learning_rate", "1e-2"]
    cmd += ["--random_flip", "True", "--caption_dropout", "0.3", "--ckpt_save_interval", "0", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cached_training_equals_uncached_and_resumes(tmp_path):
    """Four steps with flips, caption dropout and a validation grid: uncached, then cached in two runs (2 steps, then
    ``--resume True`` to 4). Losses agree to 1e-5 relative and the adapter to 1e-4 of its norm: only float32
    summation order differs (batch-1 encodes vs batch-2; measured 1e-7 and 8e-6, the same as graph vs PyNative
    of one recipe), and AdamW's first steps move near-zero gradients by a full learning rate whatever their size,
    which magnifies rounding in the weights more than in the loss. The validation grids (prompts encoded before
    the text encoder was released) are within 2 grey levels."""
    set_seed(0)
    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    setup = {"base": tmp_path / "base.safetensors", "data": make_shapes_dataset(tmp_path / "data", count=8, size=32)}
    save_model(build_model_from_config(config), setup["base"], config=config)
    validation = ["--validation_prompts", "a red circle on a white background", "--validation_steps", "4"]
    cache = ["--cache_latents", "True", "--cache_text_embeddings", "True"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    _train(setup, plain, "--max_train_steps", "4", *validation)
    first = _train(setup, cached, "--max_train_steps", "2", *validation, *cache)
    # the first run's epoch visits all 8 images; the resumed run only the 4 its remaining 2 steps of 2 visit
    assert "cached 16 latents (8 images x 2 flips) and 9 text contexts" in first.stderr
    assert "released first_stage_model.encoder" in first.stderr
    second = _train(setup, cached, "--max_train_steps", "4", "--resume", "True", *validation, *cache)
    assert "at micro-step 2" in second.stderr and "cached 8 latents (4 images x 2 flips)" in second.stderr

    np.testing.assert_allclose(_losses(cached), _losses(plain), rtol=1e-5)
    name = "ckpt/lora-000004.safetensors"
    want, got = read_state_dict(plain / name), read_state_dict(cached / name)
    assert want.keys() == got.keys()
    diff = np.sqrt(sum(float(((got[k] - want[k]) ** 2).sum()) for k in want))
    norm = np.sqrt(sum(float((want[k] ** 2).sum()) for k in want if ".alpha" not in k))
    assert diff <= 1e-4 * norm, (diff, norm)
    grids = [np.asarray(Image.open(out / "validation/step-000004.png"), dtype=np.int16) for out in (plain, cached)]
    assert np.abs(grids[0] - grids[1]).max() <= 2
