"""CLIP score: our MindSpore CLIP against transformers' CLIPModel and torchmetrics' clip_score, conversion of a
full-size ViT-B/16 key set, clipping conventions, and the eval_clip_score.py CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.metrics.clip import PRESETS, CLIPConfig, CLIPModel, load_clip_state_dict
from ldm.metrics.clip_score import aggregate, cosine_scores, embed_pairs, preprocess_image
from ldm.tokenizer import CLIPTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a photo of an astronaut", "a cat lying on a sofa", "a cup of coffee", "a rocket on the launch pad"]
TINY = dict(
    text_config=dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77
    ),
    vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8),
    projection_dim=24,
)


def _hf_tiny(image_size=32):
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel as HFModel

    torch.manual_seed(0)
    cfg = HFConfig(**{**TINY, "vision_config": {**TINY["vision_config"], "image_size": image_size}})
    return HFModel(cfg).eval(), cfg


def _ours_from_hf(hf_model, hf_cfg):
    model = CLIPModel(CLIPConfig.from_hf(hf_cfg.to_dict()))
    load_clip_state_dict(model, {k: v.detach().numpy() for k, v in hf_model.state_dict().items()})
    model.set_train(False)
    return model


def _tensor(features):
    """transformers 5 returns a model output whose ``pooler_output`` holds the projected features."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class _TensorFeatures(torch.nn.Module):
    """CLIPModel whose get_*_features return tensors, as torchmetrics expects (transformers 5 returns outputs)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.config = hf.config

    def get_image_features(self, *args, **kwargs):
        return _tensor(self.hf.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _tensor(self.hf.get_text_features(*args, **kwargs))


def _images(rng, n=4):
    sizes = [(40, 56), (64, 36), (33, 33), (50, 41)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


def _hf_processor(tmp_path, size):
    from transformers import CLIPImageProcessor, CLIPProcessor
    from transformers import CLIPTokenizer as HFTokenizer

    vocab, merges = CLIPTokenizer().save_hf_vocab(str(tmp_path / "tok"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=HFTokenizer(vocab, merges))


def test_preprocess_matches_clip_image_processor(rng, tmp_path):
    processor = _hf_processor(tmp_path, 224)
    for img in [*_images(rng), Image.fromarray(rng.integers(0, 256, (300, 500), dtype=np.uint8))]:
        ref = processor(images=img, return_tensors="np")["pixel_values"][0]
        ours = preprocess_image(img, 224, PRESETS["vit-b-16"].image_mean, PRESETS["vit-b-16"].image_std)
        # both resize with PIL bicubic; normalisation in float32: differences are float rounding only
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_embeddings_and_score_match_transformers_and_torchmetrics(rng, tmp_path):
    from torchmetrics.functional.multimodal import clip_score

    hf, cfg = _hf_tiny()
    ours = _ours_from_hf(hf, cfg)
    processor = _hf_processor(tmp_path, 32)
    images = _images(rng)
    img_emb, txt_emb = embed_pairs(ours, CLIPTokenizer(), images, PROMPTS, batch_size=3)
    inputs = processor(text=PROMPTS, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref_img = _tensor(hf.get_image_features(inputs["pixel_values"])).numpy()
        ref_txt = _tensor(hf.get_text_features(inputs["input_ids"], inputs["attention_mask"])).numpy()
    # fp32 transformer stacks of 2 layers with different matmul kernels: measured ~1e-6
    np.testing.assert_allclose(img_emb, ref_img, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(txt_emb, ref_txt, atol=1e-4, rtol=1e-4)

    scores = cosine_scores(img_emb, txt_emb)
    uint8_chw = [torch.from_numpy(np.asarray(i).transpose(2, 0, 1).copy()) for i in images]
    tm = clip_score(uint8_chw, PROMPTS, lambda: (_TensorFeatures(hf), processor))
    # torchmetrics clamps after averaging: equal to our "mean" mode; random weights give negative cosines, so the
    # per-sample clip (our default) must be >= it and differ when any pair is negative
    assert aggregate(scores, "mean") == pytest.approx(tm.item(), abs=1e-3)
    assert aggregate(scores, "per_sample") >= aggregate(scores, "mean")
    if (scores < 0).any():
        assert aggregate(scores, "per_sample") > aggregate(scores, "none")


def test_load_ignores_position_ids_and_names_missing_keys():
    from ldm.io.checkpoint import CheckpointError

    hf, cfg = _hf_tiny()
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = np.arange(77)[None]  # stored by older transformers versions
    model = CLIPModel(CLIPConfig.from_hf(cfg.to_dict()))
    load_clip_state_dict(model, sd)
    del sd["visual_projection.weight"]
    with pytest.raises(CheckpointError, match="visual_projection.weight"):
        load_clip_state_dict(model, sd, "tiny.safetensors")


def test_aggregate_modes():
    s = np.array([30.0, -10.0, 20.0])
    assert aggregate(s, "per_sample") == pytest.approx(50 / 3)
    assert aggregate(s, "mean") == pytest.approx(40 / 3)
    assert aggregate(s, "none") == pytest.approx(40 / 3)
    assert aggregate(np.array([-5.0, -1.0]), "mean") == 0.0 and aggregate(np.array([-5.0, -1.0]), "none") == -3.0
    with pytest.raises(ValueError):
        aggregate(s, "bogus")


def _hf_config(cfg):
    from transformers import CLIPConfig as HFConfig

    return HFConfig(
        text_config=dict(
            hidden_size=cfg.text_width,
            intermediate_size=cfg.text_mlp,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
        ),
        vision_config=dict(
            hidden_size=cfg.vision_width,
            intermediate_size=cfg.vision_mlp,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            patch_size=cfg.patch_size,
        ),
        projection_dim=cfg.projection_dim,
    )


@pytest.mark.parametrize(
    "name, num_params",
    [
        ("vit-b-16", 149_620_737),
        ("vit-b-32", 151_277_313),
        pytest.param("vit-l-14", 427_616_513, marks=pytest.mark.slow),
    ],
)
def test_full_size_hf_keys_convert_without_leftovers(name, num_params):
    from transformers import CLIPModel as HFModel

    hf_cfg = _hf_config(PRESETS[name])
    with torch.device("meta"):
        hf = HFModel(hf_cfg)
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert CLIPConfig.from_hf(hf_cfg.to_dict()) == PRESETS[name]
    ours = {k: tuple(p.shape) for k, p in CLIPModel(PRESETS[name]).parameters_and_names()}
    assert ours == hf_shapes  # zero missing, zero unexpected, same shapes
    assert sum(int(np.prod(s)) for s in ours.values()) == num_params  # published sizes of the OpenAI models


def _cli(*args):
    cmd = [sys.executable, os.path.join(REPO, "tools", "eval", "eval_clip_score.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _folder(tmp_path, rng, n):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, img in enumerate(_images(rng, n)):
        img.save(d / f"{i:02d}.png")
    return d


def test_cli_prompt_count_mismatch(tmp_path, rng):
    d = _folder(tmp_path, rng, 3)
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    _one_line_error(_cli("--image_dir", str(d), "--prompts", str(prompts)), "2 prompts", "3 images")


def test_cli_empty_folder(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n")
    _one_line_error(_cli("--image_dir", str(d), "--prompts", str(prompts)), "no images")


def test_cli_missing_weights(tmp_path, rng):
    d = _folder(tmp_path, rng, 2)
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    missing = str(tmp_path / "nope.safetensors")
    _one_line_error(_cli("--image_dir", str(d), "--prompts", str(prompts), "--ckpt", missing), missing)


def test_cli_end_to_end_matches_library(tmp_path, rng):
    hf, cfg = _hf_tiny()
    hf.save_pretrained(tmp_path / "hf")
    d = _folder(tmp_path, rng, 4)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "clip.json"
    proc = _cli(
        "--image_dir", str(d), "--prompts", str(prompts), "--model_dir", str(tmp_path / "hf"), "--mode", "1",
        "--clip_mode", "mean", "--output_json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    ours = _ours_from_hf(hf, cfg)
    images = [Image.open(d / f"{i:02d}.png") for i in range(4)]
    scores = cosine_scores(*embed_pairs(ours, CLIPTokenizer(), images, PROMPTS))
    assert result["clip_score"] == pytest.approx(aggregate(scores, "mean"), abs=1e-3)
    assert [r["image"] for r in result["per_image"]] == [f"{i:02d}.png" for i in range(4)]
    assert [r["prompt"] for r in result["per_image"]] == PROMPTS
    np.testing.assert_allclose([r["score"] for r in result["per_image"]], scores, atol=1e-3)


def test_cli_accepts_mindone_option_names():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools/eval/eval_clip_score.py")
    spec = importlib.util.spec_from_file_location("eval_clip_score", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--image_path_or_dir", "a.png", "--prompt_or_path", "a cat", "--ckpt_path", "c.ckpt"])
    assert (args.image_dir, args.prompts, args.ckpt) == ("a.png", "a cat", "c.ckpt")
