"""Adapter arithmetic: merging into base weights (cloneofsimo ``upl``), combining two adapters (``lpl``, exact SVD),
and applying adapters to a built model for generation.

:func:`merge_into_base` adds ``weight * dW`` to the base weights (the fused SD2 ``in_proj`` delta goes to
``in_proj_weight``); it is the one place adapters meet base weights, so it is where the adapter's family is checked
against the base's. :func:`combine_lpl` is cloneofsimo's ``lpl``: ``w1 * f_a + w2 * f_b`` for each factor, so
``dW = (w1 U_a + w2 U_b)(w1 D_a + w2 D_b)``, which is NOT ``w1 dW_a + w2 dW_b`` (an approximation kept for
compatibility). :func:`combine_svd` forms the exact ``w1 dW_a + w2 dW_b`` and truncates its SVD to the requested rank,
reporting the relative Frobenius error of every module; at rank >= ``r_a + r_b`` it is exact up to float32 rounding.

Variants: merging takes any of them (DoRA: ``W = m (W + dW) / ||W + dW||``; LoHa/LoKr: their delta, reshaped to the
base weight). ``combine_svd`` sums deltas, so it takes LoRA, LoCon, LoHa and LoKr (the result is a LoRA); DoRA's
weight is not a delta (it depends on the base), so a DoRA module is refused by name, and ``combine_lpl`` (a sum of
LoRA factors) refuses LoHa/LoKr as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.io.checkpoint import CheckpointError
from ldm.lora.adapter import (
    Adapter,
    Module,
    delta_weight,
    dora_weight,
    fused_weight_key,
    make_adapter,
    module_scale,
    parse,
    product_delta,
    read_adapter,
    without_text_encoder,
)
from ldm.names import family_of_state_dict


@dataclass
class SvdReport:
    """Relative Frobenius error ``||dW - dW_r|| / ||dW||`` of every module and over all modules together."""

    per_module: dict
    overall: float


def merge_into_base(base_state: dict, adapter: Adapter, weight: float = 1.0, source="adapter") -> dict:
    """A copy of ``base_state`` (full LDM keys) with ``W += weight * alpha / r * up @ down`` for every module (DoRA:
    ``W = m (W + weight dW) / ||W + weight dW||``; LoHa/LoKr: ``W += weight * dW``); the fused SD2 ``in_proj`` delta
    goes to ``<attn>.in_proj_weight``. Arithmetic in float64, result in W's dtype.

    The adapter's family must be the base's (read from its text-encoder keys), even where the shapes would agree.
    """
    loras, magnitudes, products = parse(adapter, source)
    family = adapter.meta.get("family")
    base_family = family_of_state_dict(base_state)
    if base_family is not None and base_family != family:
        raise CheckpointError(
            f"{source}: adapter family {family!r} does not match the base model family {base_family!r}"
        )
    deltas = {path: delta_weight(*m) for path, m in loras.items()}
    deltas.update({path: product_delta(*m) for path, m in products.items()})
    out = dict(base_state)
    for path, delta in deltas.items():
        key = fused_weight_key(path) or path + ".weight"
        if key not in base_state:
            raise CheckpointError(
                f"{source}: base checkpoint has no key {key!r} for LoRA module {path!r} "
                f"(wrong family or model? adapter family {family!r})"
            )
        base = np.asarray(base_state[key])
        if delta.size != base.size or delta.shape[0] != base.shape[0]:
            raise CheckpointError(
                f"{source}: LoRA module {path!r}: delta shape {delta.shape} does not fit {key!r} {base.shape}"
            )
        if path in magnitudes:
            merged = dora_weight(base, weight * delta, magnitudes[path])
        else:
            merged = base.astype(np.float64) + weight * delta.reshape(base.shape)
        out[key] = merged.astype(base.dtype)
    return out


def apply_adapters(model, adapters: list, text_encoder: bool = True, log=print) -> None:
    """Merge each ``(path, scale)`` adapter into ``model``'s weights (checked by :func:`merge_into_base` first, all
    before any weight changes). With ``text_encoder=False`` text-encoder modules are dropped (with a note)."""
    from ldm.io.loading import cell_state_dict, load_state_dict_into

    loaded = []
    for path, scale in adapters:
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: LoRA adapter file not found")
        adapter = read_adapter(path)
        if not text_encoder:
            kept = without_text_encoder(adapter)
            dropped = len(adapter.state) - len(kept.state)
            if dropped:
                log(f"note: {path}: ignoring {dropped} text-encoder LoRA tensors (--lora_ft_text_encoder is off)")
                if not kept.state:
                    log(f"note: {path}: nothing left to merge")
                    continue
                adapter = kept
        loaded.append((path, adapter, scale))
    if not loaded:
        return
    state = cell_state_dict(model)
    for path, adapter, scale in loaded:
        state = merge_into_base(state, adapter, weight=scale, source=path)
    load_state_dict_into(model, state, source="merged LoRA weights")


def _same_family(a: Adapter, b: Adapter) -> str:
    if a.meta.get("family") != b.meta.get("family"):
        raise CheckpointError(f"cannot combine a {a.meta.get('family')} adapter with a {b.meta.get('family')} one")
    return a.meta["family"]


def _combinable(adapter: Adapter, source: str, mode: str, products_ok: bool) -> tuple:
    """``(loras, products)`` of an adapter ``combine`` can sum exactly; DoRA (and, for lpl, LoHa/LoKr) refused."""
    loras, magnitudes, products = parse(adapter, source)
    if magnitudes:
        raise CheckpointError(
            f"{source}: DoRA module {next(iter(magnitudes))!r} cannot be combined exactly (its weight m (W + dW) / "
            f"||W + dW|| depends on the base weight, not a delta); merge it into the base instead"
        )
    if products and not products_ok:
        path, (kind, _, _) = next(iter(products.items()))
        raise CheckpointError(f"{source}: {mode} sums LoRA factors; {kind} module {path!r} has none (use --mode svd)")
    return loras, products


def combine_lpl(a: Adapter, b: Adapter, w1: float = 1.0, w2: float = 1.0) -> Adapter:
    """cloneofsimo ``lpl``: ``up = w1 up_a + w2 up_b`` and ``down = w1 down_a + w2 down_b`` per module.

    Approximate: the delta is ``(w1 U_a + w2 U_b)(w1 D_a + w2 D_b)``, not ``w1 dW_a + w2 dW_b``. Both adapters need
    the same modules and ranks. Where their scales differ, ``alpha / r`` is first folded into each up (alpha = r).
    """
    _same_family(a, b)
    ma, _ = _combinable(a, "first adapter", "lpl", False)
    mb, _ = _combinable(b, "second adapter", "lpl", False)
    if set(ma) != set(mb):
        only = sorted(set(ma) ^ set(mb))
        raise CheckpointError(f"lpl needs the same modules in both adapters; {len(only)} differ, e.g. {only[0]!r}")
    out = {}
    for path in ma:
        (da, ua, aa), (db, ub, ab) = ma[path], mb[path]
        if da.shape != db.shape or ua.shape != ub.shape:
            raise CheckpointError(
                f"lpl needs equal shapes/ranks; {path!r}: {da.shape}/{ua.shape} vs {db.shape}/{ub.shape}"
            )
        sa, sb = module_scale(da, aa), module_scale(db, ab)
        alpha = aa
        if sa != sb:
            ua, ub, alpha = ua * sa, ub * sb, float(da.shape[0])
        out[path] = Module(w1 * da.astype(np.float64) + w2 * db, w1 * ua.astype(np.float64) + w2 * ub, alpha)
    return make_adapter(out, a.meta)


def _deltas(adapter: Adapter, source: str) -> dict:
    """``{module: float64 delta}`` of every module of an adapter ``combine_svd`` can sum."""
    loras, products = _combinable(adapter, source, "svd", True)
    return {**{p: delta_weight(*m) for p, m in loras.items()}, **{p: product_delta(*m) for p, m in products.items()}}


def combine_svd(a: Adapter, b: Adapter, w1: float = 1.0, w2: float = 1.0, rank: int = 8) -> tuple:
    """``(adapter, SvdReport)``: per module the exact ``w1 dW_a + w2 dW_b`` (a module in one adapter only counts
    once) truncated to ``rank`` by SVD; ``up = U S``, ``down = Vh``, ``alpha = rank`` (scale 1). The report's errors
    are measured on the float32 factors written, relative to the exact float64 delta."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    _same_family(a, b)
    ma, mb = _deltas(a, "first adapter"), _deltas(b, "second adapter")
    out, errors = {}, {}
    total_res, total_ref = 0.0, 0.0
    for path in sorted(set(ma) | set(mb)):
        parts = [w * m[path] for w, m in ((w1, ma), (w2, mb)) if path in m]
        shapes = {p.shape for p in parts}
        if len(shapes) != 1 and len({p.size for p in parts}) == 1 and any(p.ndim == 4 for p in parts):
            parts = [p.reshape(next(q.shape for q in parts if q.ndim == 4)) for p in parts]  # LoHa conv: [out, in*k*k]
        elif len(shapes) != 1:
            raise CheckpointError(f"{path!r}: the adapters' deltas have different shapes {[p.shape for p in parts]}")
        delta = sum(parts)
        kernel = delta.shape[1:]
        u, s, vh = np.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
        r = min(rank, s.size)
        up = (u[:, :r] * s[:r]).astype(np.float32)
        down = vh[:r].reshape((r,) + kernel).astype(np.float32)
        residual = np.linalg.norm(delta - delta_weight(down, up, float(r)))
        reference = np.linalg.norm(delta)
        errors[path] = float(residual / reference) if reference > 0 else 0.0
        total_res += residual**2
        total_ref += reference**2
        out[path] = Module(down, up, float(r))
    overall = float(np.sqrt(total_res / total_ref)) if total_ref > 0 else 0.0
    return make_adapter(out, a.meta), SvdReport(errors, overall)
