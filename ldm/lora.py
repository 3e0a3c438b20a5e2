"""Low-rank adapters (LoRA) for the Dense layers of the UNet and the text encoders.

A LoRA layer adds ``up(down(dropout(x))) * (alpha / rank) * scale`` to a frozen linear map ``W x + b`` (PEFT's
convention ``scaling = alpha / rank``; ``alpha`` defaults to ``rank``, i.e. scaling 1, as diffusers, cloneofsimo and
MindONE train). ``down`` is initialised N(0, std=1/rank) and ``up`` to zeros, so an injected network computes exactly
what it computed before. ``scale`` is a runtime strength knob that is not stored with the weights.

Naming. The frozen base keeps its Parameter objects *and names* (``...attn1.to_q.weight`` stays
``...attn1.to_q.weight``, unlike MindONE's ``...to_q.linear.weight``), so a full Stability/CompVis checkpoint still
loads into an injected network by its original names. The adapter parameters are ``<module>.lora_down.weight``
``[rank, in]`` and ``<module>.lora_up.weight`` ``[out, rank]`` (the MindONE names, and the PEFT/kohya shapes), where
``<module>`` is the base weight's name without ``.weight``, e.g.
``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight``. Parameter names equal
the cell paths, so a parent cell built around an injected network renames nothing inconsistently.

Graph mode. MindSpore compiles Python attributes into the graph as constants, so the effective multiplier
``scale * alpha / rank`` (0 while merged) lives in a non-trainable scalar Parameter ``<module>.lora_mult``; changing
the scale or merging therefore takes effect without recompiling. It is not part of :func:`lora_state_dict`.

Fused OpenCLIP ``in_proj``. SD2's text encoder keeps q/k/v as one raw ``in_proj_weight`` ``[3d, d]`` Parameter inside
its attention cell, so there is no Dense to replace. :class:`LoRAFusedInProj` computes only the low-rank delta
``[.., 3d]``; an attention cell supports it by setting ``self.in_proj_lora = None`` in ``__init__`` and, in
``construct``, adding ``self.in_proj_lora(x)`` to its fused projection when it is not None. The delta is one rank-r
LoRA on the fused map (MindONE's choice), i.e. q/k/v share ``lora_down``; its parameters are
``<attn>.in_proj_lora.lora_{down,up}.weight``. Merging adds the delta to ``in_proj_weight``.

1x1-convolution ``proj_in``/``proj_out`` (SD1) are not adapted: :func:`inject_lora` skips them with a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal

from ldm.models.layers import assign_array

logger = logging.getLogger(__name__)

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_EXTENDED_TARGETS = UNET_ATTENTION_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGETS = (
    "self_attn.q_proj",  # SD1, HF CLIP names
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "attn.in_proj",  # SD2, OpenCLIP fused q/k/v (see LoRAFusedInProj)
    "attn.out_proj",
)
FUSED_IN_PROJ_HOOK = "in_proj_lora"
METADATA_FORMAT = "ldm-lora/1"
_LORA_DTYPES = (ms.float32, ms.float16)


class _LowRankProj(nn.Dense):
    """Bias-free Dense on 2-D input that computes in the input's dtype (parameters stay float32)."""

    def construct(self, x):
        return self.matmul(x, self.weight.astype(x.dtype))


def _mixed_precision_dtype(cell: nn.Cell):
    """The dtype a cell was switched to with ``Cell.to_float`` (None if it computes in its parameters' dtype)."""
    flags = cell.get_flags()
    if flags.get("fp16"):
        return ms.float16
    if flags.get("bf16"):
        return ms.bfloat16
    return None


class LoRALayer(nn.Cell):
    """The low-rank branch shared by every LoRA variant: ``lora_up(lora_down(dropout(x))) * lora_mult``.

    Subclasses name the frozen weight the delta merges into (``_merge_target``). ``lora_dtype`` is the compute dtype
    of the branch (float16 halves its activation memory; the parameters stay float32 either way).
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha=None, dropout: float = 0.0, lora_dtype=ms.float32
    ):
        super().__init__()
        if rank < 1 or rank > min(in_features, out_features):
            raise ValueError(f"LoRA rank must be in [1, min(in, out) = {min(in_features, out_features)}], got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if lora_dtype not in _LORA_DTYPES:
            raise ValueError(f"lora_dtype must be float32 or float16, got {lora_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = 1.0
        self.lora_dtype = lora_dtype
        self.merged = False
        self.target = ""  # the inject_lora target pattern that selected this module
        self.lora_down = _LowRankProj(in_features, rank, has_bias=False, weight_init=Normal(1.0 / rank))
        self.lora_up = _LowRankProj(rank, out_features, has_bias=False, weight_init="zeros")
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_mult = Parameter(Tensor(self.scaling, ms.float32), name="lora_mult", requires_grad=False)

    @property
    def scaling(self) -> float:
        """PEFT's ``lora_alpha / r``."""
        return self.alpha / self.rank

    def _merge_target(self) -> Parameter:
        raise NotImplementedError

    def _lora_branch(self, x2d, out_dtype):
        """Low-rank delta of 2-D input ``x2d``, in ``out_dtype``."""
        h = self.lora_up(self.lora_down(self.dropout(x2d.astype(self.lora_dtype))))
        return h.astype(out_dtype) * self.lora_mult.astype(out_dtype)

    def _sync_mult(self) -> None:
        value = 0.0 if self.merged else self.scale * self.scaling
        assign_array(self.lora_mult, np.float32(value))

    def set_scale(self, scale: float) -> None:
        """Set the runtime strength; a merged layer is re-merged with the new scale."""
        merged = self.merged
        if merged:
            self.unmerge()
        self.scale = float(scale)
        self._sync_mult()
        if merged:
            self.merge()

    def set_alpha(self, alpha: float) -> None:
        """Set alpha (e.g. from a loaded adapter's metadata); scaling becomes ``alpha / rank``."""
        if self.merged:
            raise RuntimeError(f"{self.lora_down.weight.name}: unmerge before changing alpha")
        self.alpha = float(alpha)
        self._sync_mult()

    def delta_weight(self) -> np.ndarray:
        """``scale * alpha / rank * up @ down`` as float32 ``[out, in]`` (accumulated in float64)."""
        up = self.lora_up.weight.asnumpy().astype(np.float64)
        down = self.lora_down.weight.asnumpy().astype(np.float64)
        return (self.scale * self.scaling * (up @ down)).astype(np.float32)

    def _add_to_target(self, sign: float) -> None:
        target = self._merge_target()
        value = target.asnumpy().astype(np.float32) + sign * self.delta_weight()
        assign_array(target, value)

    def merge(self) -> None:
        """Fold the adapter into the base weight (``W += scale * alpha / r * up @ down``) and bypass the branch."""
        if self.merged:
            logger.warning("%s is already merged; nothing to do", self._merge_target().name)
            return
        self._add_to_target(1.0)
        self.merged = True
        self._sync_mult()

    def unmerge(self) -> None:
        """Exact inverse of :meth:`merge` up to float32 rounding (the same delta is subtracted)."""
        if not self.merged:
            logger.warning("%s is not merged; nothing to do", self._merge_target().name)
            return
        self._add_to_target(-1.0)
        self.merged = False
        self._sync_mult()

    def lora_parameters(self) -> tuple[Parameter, Parameter]:
        return self.lora_down.weight, self.lora_up.weight

    def _name_parameters(self, prefix: str) -> None:
        self.lora_down.weight.name = f"{prefix}.lora_down.weight"
        self.lora_up.weight.name = f"{prefix}.lora_up.weight"
        self.lora_mult.name = f"{prefix}.lora_mult"

    def extend_repr(self):
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, "
            f"scale={self.scale}, lora_dtype={self.lora_dtype}, merged={self.merged}"
        )


class LoRADense(LoRALayer):
    """A frozen ``nn.Dense`` plus a LoRA branch: ``base(x) + up(down(dropout(x))) * alpha / rank * scale``.

    The base's ``weight``/``bias`` Parameters are reused (same objects, same names) and frozen. A base switched to
    float16/bfloat16 with ``to_float`` keeps computing in that dtype; the output has the base path's dtype.
    """

    def __init__(self, base: nn.Dense, rank: int, alpha=None, dropout: float = 0.0, lora_dtype=ms.float32):
        if not isinstance(base, nn.Dense):
            raise TypeError(f"LoRADense wraps an nn.Dense, got {type(base).__name__}")
        if base.activation_flag:
            raise ValueError("LoRADense does not support a Dense with a fused activation")
        super().__init__(base.in_channels, base.out_channels, rank, alpha, dropout, lora_dtype)
        names = (base.weight.name, base.bias.name if base.has_bias else None)
        self.weight = base.weight
        self.has_bias = base.has_bias
        self.bias = base.bias if base.has_bias else None
        self.compute_dtype = _mixed_precision_dtype(base)
        self.weight.requires_grad = False
        self.weight.name = names[0]  # Cell.__setattr__ may have renamed a Parameter with a generated name
        if self.has_bias:
            self.bias.requires_grad = False
            self.bias.name = names[1]
        self.matmul = ops.MatMul(transpose_b=True)

    def _merge_target(self) -> Parameter:
        return self.weight

    def construct(self, x):
        x_shape = x.shape
        x2d = x.reshape(-1, x_shape[-1]) if len(x_shape) != 2 else x
        h = x2d
        w = self.weight
        if self.compute_dtype is not None:
            h = h.astype(self.compute_dtype)
            w = w.astype(self.compute_dtype)
        out = self.matmul(h, w)
        if self.has_bias:
            out = out + self.bias.astype(out.dtype)
        out = out + self._lora_branch(x2d, out.dtype)
        if len(x_shape) != 2:
            out = out.reshape(x_shape[:-1] + (self.out_features,))
        return out


class LoRAFusedInProj(LoRALayer):
    """Low-rank delta ``[.., 3d]`` for a fused q/k/v ``in_proj_weight`` ``[3d, d]`` of an OpenCLIP attention cell.

    The attention cell adds ``self.in_proj_lora(x)`` to ``x @ in_proj_weight.T + in_proj_bias``; the delta has the
    input's dtype. The target weight is held by reference for :meth:`merge` and is not a parameter of this cell.
    """

    def __init__(self, in_proj_weight: Parameter, rank: int, alpha=None, dropout: float = 0.0, lora_dtype=ms.float32):
        if len(in_proj_weight.shape) != 2:
            raise ValueError(f"{in_proj_weight.name}: expected a 2-D [3d, d] weight, got {in_proj_weight.shape}")
        out_features, in_features = in_proj_weight.shape
        super().__init__(in_features, out_features, rank, alpha, dropout, lora_dtype)
        object.__setattr__(self, "_target_weight", in_proj_weight)  # bypass Cell: not a parameter of this cell

    def _merge_target(self) -> Parameter:
        return self._target_weight

    def construct(self, x):
        x_shape = x.shape
        x2d = x.reshape(-1, x_shape[-1]) if len(x_shape) != 2 else x
        out = self._lora_branch(x2d, x.dtype)
        if len(x_shape) != 2:
            out = out.reshape(x_shape[:-1] + (self.out_features,))
        return out


def _match(path: str, targets: Iterable[str]) -> str | None:
    """The first target that equals ``path`` or is a dotted suffix of it."""
    for target in targets:
        if path == target or path.endswith("." + target):
            return target
    return None


def _replace_child(parent: nn.Cell, key: str, new: nn.Cell) -> None:
    if isinstance(parent, (nn.SequentialCell, nn.CellList)):
        parent[int(key)] = new
    else:
        setattr(parent, key, new)


def _module_prefix(param: Parameter, suffix: str, fallback: str) -> str:
    return param.name[: -len(suffix)] if param.name.endswith(suffix) else fallback


def lora_layers(network: nn.Cell) -> Iterator[tuple[str, LoRALayer]]:
    """``(module name, layer)`` for every LoRA layer; the name is the prefix of its ``lora_down.weight``."""
    for _, cell in network.cells_and_names():
        if isinstance(cell, LoRALayer):
            yield cell.lora_down.weight.name[: -len(".lora_down.weight")], cell


def _freeze_all_but_lora(network: nn.Cell) -> None:
    lora_ids = {id(p) for _, layer in lora_layers(network) for p in layer.lora_parameters()}
    for param in network.get_parameters():
        param.requires_grad = id(param) in lora_ids
    trainable = {id(p) for p in network.trainable_params()}
    if trainable != lora_ids:
        raise RuntimeError(
            f"after LoRA injection {len(trainable)} parameters are trainable, expected exactly the "
            f"{len(lora_ids)} LoRA parameters"
        )


def inject_lora(
    network: nn.Cell,
    targets: Iterable[str] | str = UNET_ATTENTION_TARGETS,
    rank: int = 4,
    alpha=None,
    dropout: float = 0.0,
    lora_dtype=ms.float32,
    scope: str | None = None,
) -> list[str]:
    """Replace every Dense whose path ends with a target by a :class:`LoRADense`, then freeze all but LoRA.

    ``targets`` are dotted path suffixes (``"to_q"``, ``"attn1.to_q"``, ``"ff.net.0.proj"``, ``"self_attn.q_proj"``);
    a target ending in ``in_proj`` selects the fused ``in_proj_weight`` of an attention cell (:class:`LoRAFusedInProj`,
    attached as ``in_proj_lora``). ``scope`` restricts the search to one sub-cell path (e.g.
    ``"model.diffusion_model"``). Matching cells that are not Dense (SD1's 1x1-conv ``proj_in``) are skipped with a
    warning. Every parameter outside LoRA layers gets ``requires_grad=False``, and the trainable set is checked to
    be exactly the LoRA parameters. Returns the injected module names, in network order.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError("inject_lora needs at least one target")
    cells = dict(network.cells_and_names())
    inside_lora = tuple(f"{p}." for p, c in cells.items() if isinstance(c, LoRALayer))
    plans, skipped = [], []
    for path, cell in cells.items():
        if scope and not (path == scope or path.startswith(scope + ".")):
            continue
        if isinstance(cell, LoRALayer):
            if _match(path, targets):
                raise ValueError(f"{path} already has a LoRA adapter; inject once per network")
            continue
        if path.startswith(inside_lora):
            continue
        fused_target = _match(f"{path}.in_proj" if path else "in_proj", targets)
        if fused_target and isinstance(getattr(cell, "in_proj_weight", None), Parameter):
            if not hasattr(cell, FUSED_IN_PROJ_HOOK):
                raise ValueError(
                    f"{path} ({type(cell).__name__}) has a fused in_proj_weight but no "
                    f"'{FUSED_IN_PROJ_HOOK}' hook; see ldm.lora.LoRAFusedInProj"
                )
            if getattr(cell, FUSED_IN_PROJ_HOOK) is not None:
                raise ValueError(f"{path}.{FUSED_IN_PROJ_HOOK} already has a LoRA adapter; inject once per network")
            plans.append(("fused", path, cell, fused_target))
        target = _match(path, targets)
        if target is None:
            continue
        if isinstance(cell, nn.Dense):
            plans.append(("dense", path, cell, target))
        else:
            skipped.append(f"{path} ({type(cell).__name__})")
    if skipped:
        logger.warning(
            "LoRA skipped %d matching modules that are not Dense (no conv LoRA): %s", len(skipped), ", ".join(skipped)
        )
    if not plans:
        raise ValueError(
            f"no Dense module matches LoRA targets {list(targets)}" + (f" under scope {scope!r}" if scope else "")
        )
    injected = []
    for kind, path, cell, target in plans:
        if kind == "dense":
            base_names = [(p, p.name) for p in (cell.weight, cell.bias) if p is not None]
            layer = LoRADense(cell, rank, alpha, dropout, lora_dtype)
            prefix = _module_prefix(cell.weight, ".weight", path)
            parent_path, _, key = path.rpartition(".")
            _replace_child(cells[parent_path], key, layer)
            for param, name in base_names:  # the parent re-prefixed them with its relative path
                param.name = name
        else:
            weight = cell.in_proj_weight
            layer = LoRAFusedInProj(weight, rank, alpha, dropout, lora_dtype)
            prefix = _module_prefix(weight, ".in_proj_weight", path) + f".{FUSED_IN_PROJ_HOOK}"
            setattr(cell, FUSED_IN_PROJ_HOOK, layer)
        layer.target = target
        layer._name_parameters(prefix)
        injected.append(prefix)
    _freeze_all_but_lora(network)
    logger.info(
        "LoRA rank %d injected into %d modules (%d trainable parameters)",
        rank,
        len(injected),
        sum(int(np.prod(p.shape)) for p in network.trainable_params()),
    )
    return injected


def count_lora_parameters(network: nn.Cell) -> int:
    """Number of LoRA weights (``rank * (in + out)`` per module)."""
    return sum(int(np.prod(p.shape)) for _, layer in lora_layers(network) for p in layer.lora_parameters())


def lora_state_dict(network: nn.Cell) -> dict[str, np.ndarray]:
    """``{<module>.lora_down.weight: [r, in], <module>.lora_up.weight: [out, r]}`` as float32 numpy arrays."""
    return {p.name: p.asnumpy() for _, layer in lora_layers(network) for p in layer.lora_parameters()}


def lora_metadata(network: nn.Cell, family: str = "") -> dict[str, str]:
    """String metadata for a safetensors header: format, family, targets and per-module rank/alpha (JSON)."""
    modules = {
        name: {"rank": layer.rank, "alpha": layer.alpha, "kind": type(layer).__name__}
        for name, layer in lora_layers(network)
    }
    targets = sorted({layer.target for _, layer in lora_layers(network)})
    return {
        "lora.format": METADATA_FORMAT,
        "lora.family": family,
        "lora.targets": json.dumps(targets),
        "lora.modules": json.dumps(modules, sort_keys=True),
    }


def load_lora_state_dict(network: nn.Cell, state_dict: dict, metadata: dict[str, str] | None = None) -> None:
    """Copy LoRA weights into ``network`` by exact parameter name (never MindSpore's prefix guessing).

    Every LoRA parameter must be present and nothing else may be; shapes must match. With ``metadata`` (from
    :func:`lora_metadata`) each module's alpha is set from it, so an adapter trained with another alpha keeps its
    strength. Raises ``KeyError``/``ValueError`` naming the offending keys.
    """
    layers = dict(lora_layers(network))
    if not layers:
        raise ValueError("network has no LoRA layers; call inject_lora first")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"unmerge LoRA before loading weights (merged: {', '.join(merged[:5])})")
    params = {p.name: p for layer in layers.values() for p in layer.lora_parameters()}
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:5])}")
        raise KeyError("LoRA state dict does not match the network: " + "; ".join(parts))
    values = {}
    for name, param in params.items():
        value = state_dict[name]
        value = value.asnumpy() if isinstance(value, Tensor) else np.asarray(value)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"LoRA key {name}: shape {tuple(value.shape)} in the state dict, {tuple(param.shape)} "
                "in the network (different rank?)"
            )
        values[name] = value
    modules = json.loads(metadata["lora.modules"]) if metadata and "lora.modules" in metadata else {}
    for name, param in params.items():
        assign_array(param, values[name])
    for name, info in modules.items():
        if name not in layers:
            raise KeyError(f"LoRA metadata names module {name}, which the network does not have")
        if int(info["rank"]) != layers[name].rank:
            raise ValueError(f"LoRA module {name}: metadata rank {info['rank']} != network rank {layers[name].rank}")
        layers[name].set_alpha(float(info["alpha"]))


def merge_all(network: nn.Cell) -> int:
    """Merge every LoRA layer into its base weight; returns the number of layers."""
    layers = [layer for _, layer in lora_layers(network)]
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_all(network: nn.Cell) -> int:
    """Undo :func:`merge_all`; returns the number of layers."""
    layers = [layer for _, layer in lora_layers(network)]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def set_lora_scale(network: nn.Cell, scale: float) -> int:
    """Set the runtime scale of every LoRA layer (graph mode picks it up without recompiling)."""
    layers = [layer for _, layer in lora_layers(network)]
    for layer in layers:
        layer.set_scale(scale)
    return len(layers)
