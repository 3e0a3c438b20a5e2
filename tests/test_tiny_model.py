"""The shipped tiny SD (models/tiny_sd): every file loads strictly, a fixed-seed generation matches a committed
reference, a short LoRA run lowers the diffusion loss on the held-out blueprint concept, and the recipe's tools do what
they claim: caption-prefix, ground and negative augmentation (``train_tiny_sd.py``) never show the concept, a held-out
category leaves the base split whole, every held-out concept's ink reads back, and a decoder-only VAE fine-tune keeps
the encoder.

Regenerate the reference (only after retraining the model on purpose): ``python tests/test_tiny_model.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models/tiny_sd"
REFERENCE = ROOT / "tests/data/tiny_sd_reference.npz"
PROMPTS = ["a clip art drawing of a red apple (fruit, food)", "a blueprint drawing of reload (icons, computer)"]
# Mean absolute difference allowed, in 0..255 pixel levels. Bit-exact output is not expected across CPUs (oneDNN
# picks kernels by ISA and thread count, so fp32 sums round differently and 10 sampler steps carry that on); a wrong
# weight, key or config moves the images by tens of levels (the other-seed check below shows how far).
MEAN_TOLERANCE = 1.5


def _model():
    from ldm.io.model_config import resolve_model_config
    from ldm.io.model_io import load_pretrained
    from ldm.models.diffusion import build_model_from_config

    model = build_model_from_config(resolve_model_config(checkpoint=MODEL / "tiny_sd.safetensors").config)
    report = load_pretrained(model, MODEL / "tiny_sd.safetensors")
    model.set_train(False)
    return model, report


def _generate(model, seed: int) -> np.ndarray:
    from ldm.pipeline import GenerationSettings, Text2ImagePipeline

    settings = GenerationSettings(steps=10, scale=5.0, height=64, width=64)
    return np.asarray(Text2ImagePipeline(model, sampler="dpm_solver_pp")(PROMPTS, settings=settings, seed=seed))


def test_shipped_files_load_strictly():
    from ldm.io.checkpoint import read_state_dict
    from ldm.io.loading import cell_state_dict
    from ldm.metrics.clip import CLIPModel, load_clip_state_dict, load_config

    model, _ = _model()  # load_pretrained raises on any missing, unexpected or mis-shaped key
    assert len(cell_state_dict(model)) == len(read_state_dict(MODEL / "tiny_sd.safetensors"))
    clip = CLIPModel(load_config(str(MODEL / "clip")))
    load_clip_state_dict(clip, read_state_dict(MODEL / "clip/model.safetensors"), "clip")
    rows = (MODEL / "data/blueprint_train/metadata.jsonl").read_text().splitlines()
    assert len(rows) == 200 and all(
        (MODEL / "data/blueprint_train" / json.loads(r)["file_name"]).is_file() for r in rows
    )
    assert np.load(MODEL / "data/blueprint_test_inception_features.npz")["features"].shape == (612, 2048)


def test_fixed_seed_generation_matches_reference():
    model, _ = _model()
    images = _generate(model, seed=0).astype(np.float64)
    reference = np.load(REFERENCE)["images"].astype(np.float64)
    assert images.shape == reference.shape == (2, 64, 64, 3)
    assert np.abs(images - reference).mean() <= MEAN_TOLERANCE
    other_seed = _generate(model, seed=1).astype(np.float64)
    assert np.abs(other_seed - reference).mean() > 10 * MEAN_TOLERANCE  # the comparison can tell images apart


def _heldout_loss(model, images: np.ndarray, prompts: list[str]) -> float:
    """Epsilon MSE at fixed timesteps and noise, so before/after differ only by the weights."""
    import mindspore as ms

    rng = np.random.default_rng(0)
    x = ms.Tensor(images)
    mean, logvar = model.encode_first_stage(x)
    z = model.get_first_stage_encoding(mean, logvar)  # posterior mean
    t = ms.Tensor(np.linspace(50, 900, len(images)).astype(np.int32))
    noise = ms.Tensor(rng.standard_normal(z.shape).astype(np.float32))
    context = model.get_learned_conditioning(ms.Tensor(model.tokenize(prompts)))
    pred = model.apply_model(model.q_sample(z, t, noise), t, context)
    return float(((pred - noise) ** 2).mean().asnumpy())


def test_short_lora_run_lowers_heldout_loss(tmp_path):
    from PIL import Image

    from ldm.lora.adapter import read_adapter
    from ldm.lora.network import load_adapter
    from ldm.train.options import parse_options, resolve_train_config
    from ldm.train.trainer import build_trainable_model, run_training

    data = MODEL / "data/blueprint_train"
    rows = [json.loads(r) for r in (data / "metadata.jsonl").read_text().splitlines()][:8]
    images = np.stack([np.asarray(Image.open(data / r["file_name"]).convert("RGB"), np.float32) for r in rows])
    images = (images / 127.5 - 1.0).transpose(0, 3, 1, 2)
    prompts = [r["text"] for r in rows]

    base, _ = _model()
    before = _heldout_loss(base, images, prompts)
    # The demo's recipe, shortened: 12 updates of 8 images in PyNative mode (no graph compile), ~1/8 of the demo's
    # run; the demo's loss falls by about 40% over its 100 updates; 10% after 12 is the bar.
    argv = ["--train_config", str(ROOT / "configs/train/train_config_lora_tiny_sd_blueprint.yaml")]
    argv += ["--data_path", str(data), "--output_path", str(tmp_path), "--max_train_steps", "12", "--warmup_steps", "2"]
    argv += ["--pretrained_model_path", str(MODEL / "tiny_sd.safetensors"), "--validation_steps", "0", "--mode", "1"]
    opts = parse_options(argv)
    config = resolve_train_config(opts).config
    adapter = run_training(opts, config)["weights"]
    tuned, _ = build_trainable_model(opts, config)
    load_adapter(tuned, read_adapter(adapter), adapter)
    tuned.set_train(False)
    after = _heldout_loss(tuned, images, prompts)
    assert after < 0.9 * before, (before, after)


def test_loss_plot_has_ticks_series_and_lr(tmp_path):
    """The training chart (ldm.train.plot) draws raw and smoothed loss and the learning rate, with round ticks."""
    from PIL import Image

    from ldm.train.plot import LR, SMOOTH, nice_ticks, plot_metrics

    assert np.allclose(nice_ticks(0.0, 0.17), [0.0, 0.05, 0.1, 0.15])
    assert np.allclose(nice_ticks(1, 200), [50, 100, 150, 200])
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3 * min(1.0, s / 5)} for s in range(1, 51)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_metrics(metrics, tmp_path / "loss.png")
    colours = {c for _, c in Image.open(tmp_path / "loss.png").convert("RGB").getcolors(1 << 20)}
    assert SMOOTH in colours and LR in colours
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temp file left


def test_caption_prefix_augmentation_keeps_subject_and_holds_no_concept_word(tmp_path):
    """train_tiny_sd.py --prefix_augment: each spliced caption equals the tokenized text of its new phrasing + the
    subject, and no phrasing names the held-out blueprint concept or a colour."""
    import pytest

    pytest.importorskip("torch")  # train_tiny_sd.py is a PyTorch script
    pytest.importorskip("transformers")
    from ldm.tokenizer import CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tools/tiny_sd"))
    from make_data import CAPTION
    from train_tiny_sd import PLAIN_PREFIX, PREFIXES, caption_variants

    assert CAPTION.format("") == PLAIN_PREFIX + " "
    for word in ("blue", "print", "colo", "white", "dark", "negative"):
        assert not any(word in prefix for prefix in PREFIXES), word
    tokenizer = CLIPTokenizer.for_family("sd1")
    tokenizer.save_hf_vocab(str(tmp_path))
    subjects = ["a red apple (fruit, food)", "heart ballons benji park (signs and symbols)"]
    ids = np.asarray(tokenizer([CAPTION.format(s) for s in subjects]), np.int64)
    variants = caption_variants(ids, str(tmp_path))
    assert variants.shape == (1 + len(PREFIXES), *ids.shape)
    assert (variants[0] == ids).all()
    for k, prefix in enumerate(PREFIXES, 1):
        expected = tokenizer([f"{prefix} {s}".strip() for s in subjects])
        assert (variants[k] == np.asarray(expected)).all(), prefix
    with pytest.raises(ValueError, match="a clip art drawing of"):
        caption_variants(np.asarray(tokenizer(["a blueprint drawing of x"]), np.int64), str(tmp_path))


def test_every_held_out_concept_reads_back_its_ink():
    """make_data.treat draws a drawing's ink in a concept's colours; concept_bound.ink_of must read the same ink back
    (up to uint8 rounding), or the FID bound would be computed on the wrong drawings."""
    sys.path.insert(0, str(ROOT / "tools/tiny_sd"))
    from concept_bound import ink_of
    from make_data import CONCEPTS, HELD_OUT, ink, treat

    assert HELD_OUT in CONCEPTS
    rng = np.random.default_rng(0)
    drawings = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    for concept, (caption, _, _) in CONCEPTS.items():
        assert caption.count("{}") == 1
        treated = treat(drawings, concept)  # rounding: half a level of the widest channel (>= 225 levels here)
        assert np.abs(ink_of(treated, concept) - ink(drawings)).max() <= 0.003, concept
    plain = np.full((1, 2, 2, 3), 255, np.uint8)  # no ink: all paper
    assert (treat(plain, "blueprint") == np.array(CONCEPTS["blueprint"][1], np.uint8)).all()


def test_ground_augmentation_paints_the_paper_and_names_it(tmp_path):
    """train_tiny_sd.py --ground_augment: where a drawing has no ink the ground colour shows, where it is fully inked
    the drawing's own colour stays; the caption gains "on <colour> paper"; no ground is the held-out concept's."""
    import pytest

    pytest.importorskip("torch")  # train_tiny_sd.py is a PyTorch script
    pytest.importorskip("transformers")
    from ldm.tokenizer import CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tools/tiny_sd"))
    from make_data import CAPTION, CONCEPTS
    from train_tiny_sd import GROUNDS, on_grounds

    for name, rgb in GROUNDS.items():
        assert "green" not in name and "black" not in name and max(rgb) > 60, name
    for _, paper, colour in CONCEPTS.values():
        assert tuple(paper) not in GROUNDS.values() and tuple(colour) not in GROUNDS.values()
    tokenizer = CLIPTokenizer.for_family("sd1")
    tokenizer.save_hf_vocab(str(tmp_path))
    drawings = np.full((6, 4, 4, 3), 255, np.uint8)
    drawings[:, :2] = (0, 0, 0)  # top half fully inked (black), bottom half paper
    subjects = [f"thing {i}" for i in range(6)]
    ids = np.asarray(tokenizer([CAPTION.format(s) for s in subjects]), np.int64)
    grounded, grounded_ids = on_grounds(drawings, ids, str(tmp_path), seed=0)
    assert (grounded[:, :2] == 0).all()
    for image, row, subject in zip(grounded, grounded_ids, subjects):
        name = next(n for n, rgb in GROUNDS.items() if (image[3, 3] == rgb).all())
        assert (row == np.asarray(tokenizer([f"{CAPTION.format(subject)} on {name} paper"])[0])).all()


def test_negative_augmentation_inverts_the_drawing_and_names_it(tmp_path):
    """train_tiny_sd.py --negative_augment: every RGB value inverted (white paper -> black, black ink -> white), the
    caption gains NEGATIVE_SUFFIX and names no held-out concept."""
    import pytest

    pytest.importorskip("torch")  # train_tiny_sd.py is a PyTorch script
    pytest.importorskip("transformers")
    from ldm.tokenizer import CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tools/tiny_sd"))
    from make_data import CAPTION, CONCEPTS
    from train_tiny_sd import NEGATIVE_SUFFIX, negatives

    assert not any(name.split("_")[0] in NEGATIVE_SUFFIX for name in CONCEPTS)
    tokenizer = CLIPTokenizer.for_family("sd1")
    tokenizer.save_hf_vocab(str(tmp_path))
    drawings = np.full((2, 4, 4, 3), 255, np.uint8)
    drawings[:, :2] = (200, 20, 20)  # red ink on the top half
    subjects = ["a red apple (fruit, food)", "thing 1"]
    ids = np.asarray(tokenizer([CAPTION.format(s) for s in subjects]), np.int64)
    inverted, inverted_ids = negatives(drawings, ids, str(tmp_path))
    assert (inverted[:, 2:] == 0).all() and (inverted[:, :2] == (55, 235, 235)).all()
    expected = tokenizer([f"{CAPTION.format(s)} {NEGATIVE_SUFFIX}" for s in subjects])
    assert (inverted_ids == np.asarray(expected)).all()


def test_augmentation_without_a_tokenizer_folder_is_one_clear_error(tmp_path):
    """train_tiny_sd.py --negative_augment (or --ground/prefix_augment) with neither --tokenizer nor --init: one message
    naming both options, before any training or output."""
    import pytest

    pytest.importorskip("torch")  # train_tiny_sd.py is a PyTorch script
    sys.path.insert(0, str(ROOT / "tools/tiny_sd"))
    from train_tiny_sd import main

    ids = np.full((2, 77), 49407, np.int64)
    data = tmp_path / "base_train.npz"
    np.savez(
        data, images=np.zeros((2, 4, 4, 3), np.uint8), ids=ids, held_out_ids=ids, concept="blueprint", empty_ids=ids[:1]
    )
    for flag in ("--negative_augment", "--ground_augment", "--prefix_augment"):
        with pytest.raises(SystemExit, match="--tokenizer or --init"):
            main(["--data", str(data), "--out", str(tmp_path / "out"), flag, "0.2"])
    assert not (tmp_path / "out").exists()


def test_held_out_category_leaves_the_base_split_and_keeps_plain_captions(tmp_path):
    """make_data.py --concept flags: every drawing under the category's folder, and no other, lands in flags_train /
    flags_test with its ordinary caption; base_train and base_test hold none of them; the images are not treated."""
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tools/tiny_sd"))
    import make_data

    src = tmp_path / "png"
    folder = src / make_data.CATEGORIES["flags"]
    for i in range(6):  # 6 flags in two sub-folders, 30 other drawings
        (folder / f"land{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (0, 0, 200 + i)).save(folder / f"land{i % 2}/flag_{i}.png")
    (src / "shapes").mkdir()
    for i in range(30):
        Image.new("RGB", (8, 8), (i, 100, 0)).save(src / f"shapes/star_{i}.png")
    (src / "signs_and_symbols/flagstaffs").mkdir(parents=True)  # a folder whose name only starts like the category
    Image.new("RGB", (8, 8), (7, 7, 7)).save(src / "signs_and_symbols/flagstaffs/pole.png")
    old_count = make_data.HELD_OUT_TRAIN_COUNT
    make_data.HELD_OUT_TRAIN_COUNT = 4
    try:
        assert (
            make_data.main(["--src", str(src), "--out", str(tmp_path / "out"), "--size", "8", "--concept", "flags"])
            == 0
        )
    finally:
        make_data.HELD_OUT_TRAIN_COUNT = old_count

    def read(split):
        rows = [json.loads(line) for line in (tmp_path / "out" / split / "metadata.jsonl").read_text().splitlines()]
        blues = [np.asarray(Image.open(tmp_path / "out" / split / r["file_name"]))[0, 0, 2] for r in rows]
        return [r["text"] for r in rows], blues

    held = read("flags_train")[0] + read("flags_test")[0]
    assert len(read("flags_train")[0]) == 4 and len(held) == 6
    assert all(t.startswith(make_data.CAPTION.format("flag (land")) and "flags" in t for t in held)
    assert sorted(read("flags_train")[1] + read("flags_test")[1]) == list(range(200, 206))  # untreated pixels
    base_test = read("base_test")[0]
    data = np.load(tmp_path / "out/base_train.npz")
    assert len(base_test) + len(data["images"]) == 31 and str(data["concept"]) == "flags"
    assert not any("flags" in t for t in base_test) and (data["images"][..., 2] < 200).all()


def test_decoder_only_vae_training_keeps_the_encoder(tmp_path):
    """train_tiny_sd.py --init with --vae_steps trains the VAE decoder alone: the latents the UNet learned from stay."""
    import argparse

    import pytest

    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sys.path.insert(0, str(ROOT / "tools/tiny_sd"))
    from train_tiny_sd import VAE, train_vae

    vae = diffusers.AutoencoderKL(**VAE)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    data = {"images": images, "held_out": 255 - images}
    args = argparse.Namespace(seed=0, vae_batch=2, vae_seconds=0, vae_steps=2, deadline=float("inf"), kl_weight=1e-4)
    trained, steps, _ = train_vae(data, torch.device("cpu"), args, [], vae)
    after = trained.state_dict()
    assert steps == 2
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


if __name__ == "__main__":
    import ldm  # noqa: F401  (CPU defaults before mindspore)
    from ldm.env import init_env

    init_env("CPU", mode=1, seed=0)
    model, _ = _model()
    np.savez_compressed(REFERENCE, images=_generate(model, seed=0))
    print(f"wrote {REFERENCE}")
    sys.exit(0)


def test_sweep_recipe_names_state_their_fields():
    """lora_sweep.py's results are reported by recipe name (model card, sweep JSONs): every name must spell its rank,
    targets, learning rate, updates x batch, offset noise, min-SNR gamma, caption dropout and text-encoder LoRA."""
    import re

    import pytest

    pytest.importorskip("torch")  # lora_sweep.py is a PyTorch script
    sys.path.insert(0, str(ROOT / "tools/tiny_sd"))
    import lora_sweep

    targets = {"ext": lora_sweep.EXTENDED, "conv": lora_sweep.CONV, "xkv": lora_sweep.CROSS_KV, "x": lora_sweep.CROSS}
    pattern = re.compile(
        r"(?:r(?P<rank>\d+)_(?P<targets>ext|conv|xkv|x)|full)_lr(?P<lr>[\d.e-]+)_(?P<steps>\d+)x(?P<batch>\d+)"
        r"_off(?P<offset>[\d.]+)(?:_g(?P<gamma>[\d.]+))?(?P<no_dropout>_d0)?(?P<text>_te)?"
    )
    for name, recipe in lora_sweep.RECIPES.items():
        m = pattern.fullmatch(name)
        assert m, name
        assert recipe.rank == int(m["rank"] or 0), name
        assert recipe.targets == (targets[m["targets"]] if m["targets"] else lora_sweep.FULL), name
        assert (recipe.lr, recipe.steps, recipe.batch) == (float(m["lr"]), int(m["steps"]), int(m["batch"])), name
        assert recipe.offset == float(m["offset"]), name
        assert recipe.snr_gamma == (float(m["gamma"]) if m["gamma"] else None), name
        assert recipe.caption_dropout == (0.0 if m["no_dropout"] else 0.1), name
        assert recipe.train_text == bool(m["text"]), name
