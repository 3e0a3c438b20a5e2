"""Which adapter of a run, at which LoRA strength, to ship: every (adapter, scale) candidate is scored on images it
generates at fixed seeds, and the best is picked by a stated rule.

Per candidate: FID and KID of the held-out prompts' images against real images (Inception features), CLIP score of
those images against their prompts (when a CLIP model is given) and **prior drift**: on unrelated prompts, the mean
Euclidean distance between the Inception features of the base model's image and the candidate's image at the same
seed (0 for an adapter that changes nothing; it grows as the adapter moves what the user did not train). The base
model is a candidate too (``base``, scale 0), and its images are made once: the drift of every candidate is measured
against them.

Rule: the best candidate has the lowest ``rank_by`` metric (FID, KID; the highest for CLIP) among those whose drift
is at most ``max_drift`` (all when not set); ties go to the lower drift. The Pareto front is every candidate that no
other beats on both quality and drift. Generation, feature extraction and CLIP are passed in as functions, so the
choosing is independent of the models (tests use small stand-ins; ``python -m ldm.lora select`` the real ones).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ldm.atomic import write_json
from ldm.metrics.fid import feature_stats, frechet_distance, kernel_inception_distance

RANK_BY = ("fid", "kid", "clip")
ADAPTER_NAME = re.compile(r"^lora-(\d+)\.safetensors$")

# (adapter path or None for the base model, scale, prompts, seed) -> uint8 images [N, H, W, 3], one per prompt
Render = Callable[[str | None, float, Sequence[str], int], np.ndarray]
Features = Callable[[np.ndarray], np.ndarray]  # uint8 images -> [N, D] features
ClipScore = Callable[[np.ndarray, Sequence[str]], float]  # images, their prompts -> mean CLIP score


@dataclass
class Candidate:
    """One (adapter, scale) and its scores; ``step`` is the training step of the adapter (0 for the base)."""

    label: str
    path: str | None
    step: int
    scale: float
    fid: float | None = None
    kid: float | None = None
    clip: float | None = None
    drift: float = 0.0
    pareto: bool = False
    best: bool = False

    def quality(self, rank_by: str) -> float:
        """The ranking metric as a cost (lower is better: CLIP is negated)."""
        value = getattr(self, rank_by)
        if value is None:
            raise ValueError(f"rank_by {rank_by!r}: the candidates have no {rank_by} (give what it needs)")
        return -value if rank_by == "clip" else value


def run_adapters(sources: Sequence[str]) -> list[tuple[int, str]]:
    """``(step, path)`` of the adapters named: files, or run folders (their ``ckpt/lora-<step>.safetensors``, or the
    folder's own), sorted by step; a file whose name carries no step counts its position."""
    found = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            folder = path / "ckpt" if (path / "ckpt").is_dir() else path
            files = [p for p in folder.iterdir() if ADAPTER_NAME.match(p.name)]
            if not files:
                raise FileNotFoundError(f"{source}: no lora-<step>.safetensors adapters here or in ckpt/")
            found += [(int(ADAPTER_NAME.match(p.name).group(1)), str(p)) for p in files]
        elif path.is_file():
            match = ADAPTER_NAME.match(path.name)
            found.append((int(match.group(1)) if match else len(found) + 1, str(path)))
        else:
            raise FileNotFoundError(f"{source}: no such adapter file or run folder")
    return sorted(found)


def prior_drift(base_features: np.ndarray, features: np.ndarray) -> float:
    """Mean Euclidean distance between paired feature rows (the same prompt and seed, base vs candidate)."""
    return float(np.linalg.norm(np.asarray(features, np.float64) - base_features, axis=1).mean())


def mark_choice(candidates: list[Candidate], rank_by: str, max_drift: float | None = None) -> Candidate:
    """Set ``pareto`` and ``best`` on the candidates (see the module's rule); returns the best."""
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    costs = [(c.quality(rank_by), c.drift) for c in candidates]
    for c, (q, d) in zip(candidates, costs):
        c.pareto = not any(q2 <= q and d2 <= d and (q2 < q or d2 < d) for q2, d2 in costs)
        c.best = False
    allowed = [i for i, c in enumerate(candidates) if max_drift is None or c.drift <= max_drift]
    if not allowed:
        raise ValueError(f"no candidate has a prior drift <= max_drift {max_drift}")
    best = candidates[min(allowed, key=lambda i: costs[i])]
    best.best = True
    return best


def score_candidates(
    adapters: list[tuple[int, str]],
    scales: Sequence[float],
    render: Render,
    features: Features,
    prompts: Sequence[str],
    prior_prompts: Sequence[str],
    reference: np.ndarray,
    seed: int = 0,
    clip_score: ClipScore | None = None,
    kid_subset: int = 1000,
    log: Callable[[str], None] = print,
) -> list[Candidate]:
    """Generate and score the base model and every (adapter, scale); the base's images are made once. ``reference``
    are the real images' Inception features [M, D]."""
    ref_mu, ref_sigma = feature_stats(reference)

    def scored(candidate: Candidate, base_prior: np.ndarray | None) -> tuple[Candidate, np.ndarray]:
        images = render(candidate.path, candidate.scale, prompts, seed)
        feats = features(images)
        mu, sigma = feature_stats(feats)
        candidate.fid = frechet_distance(mu, sigma, ref_mu, ref_sigma, method="eigvals")
        candidate.kid = kernel_inception_distance(feats, reference, subsets=100, subset_size=kid_subset)[0]
        if clip_score is not None:
            candidate.clip = clip_score(images, prompts)
        prior = features(render(candidate.path, candidate.scale, prior_prompts, seed))
        candidate.drift = 0.0 if base_prior is None else prior_drift(base_prior, prior)
        log(f"{candidate.label} x {candidate.scale:g}: " + describe(candidate))
        return candidate, prior

    base, base_prior = scored(Candidate("base", None, 0, 0.0), None)
    out = [base]
    for step, path in adapters:
        for scale in scales:
            out.append(scored(Candidate(Path(path).name, path, step, float(scale)), base_prior)[0])
    return out


def describe(c: Candidate) -> str:
    clip = "" if c.clip is None else f" CLIP {c.clip:.2f}"
    return f"FID {c.fid:.2f} KID {c.kid:.4f}{clip} drift {c.drift:.3f}"


def table(candidates: list[Candidate]) -> str:
    """The candidates as a text table; ``*`` marks the best, ``p`` the Pareto front."""
    lines = [f"{'':2}{'adapter':28}{'step':>7}{'scale':>7}{'FID':>10}{'KID':>10}{'CLIP':>8}{'drift':>9}"]
    for c in candidates:
        mark = ("*" if c.best else " ") + ("p" if c.pareto else " ")
        clip = "" if c.clip is None else f"{c.clip:.2f}"
        lines.append(
            f"{mark}{c.label[:28]:28}{c.step:>7}{c.scale:>7g}{c.fid:>10.2f}{c.kid:>10.4f}{clip:>8}{c.drift:>9.3f}"
        )
    return "\n".join(lines)


def rule_text(rank_by: str, max_drift: float | None) -> str:
    better = "highest" if rank_by == "clip" else "lowest"
    limit = "" if max_drift is None else f" among candidates with prior drift <= {max_drift:g}"
    return f"{better} {rank_by.upper()}{limit}; ties to the lower drift; p: Pareto front of {rank_by} vs drift"


def write_report(path: str | Path, candidates: list[Candidate], rank_by: str, max_drift, settings: dict) -> None:
    """The candidates, the rule and the choice as JSON, written atomically (temp file, fsync, rename)."""
    best = next(c for c in candidates if c.best)
    report = {
        "rule": rule_text(rank_by, max_drift),
        "rank_by": rank_by,
        "max_drift": max_drift,
        "best": asdict(best),
        "pareto": [c.label + f" x {c.scale:g}" for c in candidates if c.pareto],
        "candidates": [asdict(c) for c in candidates],
        "settings": settings,
    }
    write_json(path, report, allow_nan=False)


def plot_selection(path: str | Path, candidates: list[Candidate], rank_by: str) -> None:
    """``rank_by`` against the adapter's step, one line per scale, the base model as a line at step 0."""
    from ldm.train.plot import draw_line_chart

    series = {}
    base = next(c for c in candidates if c.path is None)
    for c in candidates:
        if c.path is not None:
            series.setdefault(f"scale {c.scale:g}", []).append((c.step, getattr(c, rank_by)))
    steps = [s for points in series.values() for s, _ in points]
    last = max(steps) if steps else 1
    series["base model"] = [(0, getattr(base, rank_by)), (last, getattr(base, rank_by))]
    finite = {k: v for k, v in series.items() if all(math.isfinite(y) for _, y in v)}
    draw_line_chart(finite, path, title=f"{rank_by.upper()} per checkpoint and scale", xlabel="step", ylabel=rank_by)
