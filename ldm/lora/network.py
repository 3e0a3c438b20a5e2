"""LoRA on a whole network: inject by target pattern, freeze the rest, read/write the adapter, merge/scale all.

``inject_lora`` replaces every matching Dense by a :class:`~ldm.lora.layers.LoRADense` (and attaches a
:class:`~ldm.lora.layers.LoRAFusedInProj` to OpenCLIP attention cells for an ``in_proj`` target); the LoRA parameter
names are the module paths of the adapter file, so :func:`load_adapter` and
:func:`to_adapter` move weights between a network and a file without renaming.
Matching convolutions (SD1's 1x1 ``proj_in``/``proj_out``, ResBlock 3x3 convs) become
:class:`~ldm.lora.layers.LoRAConv` (LoCon) with ``convolutions=True``, and are skipped with a warning otherwise.
``use_dora`` makes every injected layer DoRA.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn

from ldm.lora.adapter import FUSED_IN_PROJ, MAGNITUDE, Adapter, Module, make_adapter, parse
from ldm.lora.layers import LoRAConv, LoRADense, LoRAFusedInProj, LoRALayer
from ldm.lora.targets import UNET_ATTENTION_TARGETS
from ldm.models.layers import assign_array

logger = logging.getLogger(__name__)


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
    convolutions: bool = False,
    use_dora: bool = False,
) -> list[str]:
    """Replace every Dense whose path ends with a target by a :class:`LoRADense`, then freeze all but LoRA.

    ``targets`` are dotted path suffixes (``"to_q"``, ``"attn1.to_q"``, ``"ff.net.0.proj"``, ``"self_attn.q_proj"``);
    a target ending in ``in_proj`` selects the fused ``in_proj_weight`` of an attention cell (:class:`LoRAFusedInProj`,
    attached as ``in_proj_lora``). ``scope`` restricts the search to one sub-cell path (e.g.
    ``"model.diffusion_model"``). Matching Conv2d cells become :class:`LoRAConv` with ``convolutions`` (LoCon) and are
    skipped with a warning without it, as are other matching cells. ``use_dora`` adds DoRA's magnitude to every
    injected layer. Every parameter outside LoRA layers gets ``requires_grad=False``, and the trainable set is checked
    to be exactly the LoRA parameters. Returns the injected module names, in network order.
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
            if not hasattr(cell, FUSED_IN_PROJ):
                raise ValueError(
                    f"{path} ({type(cell).__name__}) has a fused in_proj_weight but no "
                    f"'{FUSED_IN_PROJ}' hook; see ldm.lora.layers.LoRAFusedInProj"
                )
            if getattr(cell, FUSED_IN_PROJ) is not None:
                raise ValueError(f"{path}.{FUSED_IN_PROJ} already has a LoRA adapter; inject once per network")
            plans.append(("fused", path, cell, fused_target))
        target = _match(path, targets)
        if target is None:
            continue
        if isinstance(cell, nn.Dense) or (convolutions and isinstance(cell, nn.Conv2d)):
            plans.append(("wrap", path, cell, target))
        elif not isinstance(cell, nn.Identity):  # e.g. a ResBlock's skip_connection where channels do not change
            skipped.append(f"{path} ({type(cell).__name__})")
    if skipped:
        what = "not Dense or Conv2d" if convolutions else "not Dense (conv LoRA is off: conv_rank / convolutions=True)"
        logger.warning("LoRA skipped %d matching modules that are %s: %s", len(skipped), what, ", ".join(skipped))
    if not plans:
        raise ValueError(
            f"no {'Dense/Conv2d' if convolutions else 'Dense'} module matches LoRA targets {list(targets)}"
            + (f" under scope {scope!r}" if scope else "")
        )
    injected = []
    for kind, path, cell, target in plans:
        if kind == "wrap":
            base_names = [(p, p.name) for p in (cell.weight, cell.bias) if p is not None]
            wrapper = LoRADense if isinstance(cell, nn.Dense) else LoRAConv
            layer = wrapper(cell, rank, alpha, dropout, lora_dtype, use_dora)
            prefix = _module_prefix(cell.weight, ".weight", path)
            parent_path, _, key = path.rpartition(".")
            _replace_child(cells[parent_path], key, layer)
            for param, name in base_names:  # the parent re-prefixed them with its relative path
                param.name = name
        else:
            weight = cell.in_proj_weight
            layer = LoRAFusedInProj(weight, rank, alpha, dropout, lora_dtype, use_dora)
            prefix = _module_prefix(weight, ".in_proj_weight", path) + f".{FUSED_IN_PROJ}"
            setattr(cell, FUSED_IN_PROJ, layer)
        layer.target = target
        layer._name_parameters(prefix)
        injected.append(prefix)
    _freeze_all_but_lora(network)
    logger.info(
        "%s rank %d injected into %d modules (%d trainable parameters)",
        "DoRA" if use_dora else "LoRA",
        rank,
        len(injected),
        sum(int(np.prod(p.shape)) for p in network.trainable_params()),
    )
    return injected


def count_lora_parameters(network: nn.Cell) -> int:
    """Number of adapter weights (``rank * (in * kh * kw + out)`` per module, plus ``out`` for DoRA)."""
    return sum(int(np.prod(p.shape)) for _, layer in lora_layers(network) for p in layer.lora_parameters())


def lora_parameters(network: nn.Cell) -> list:
    """The trainable adapter parameters of every LoRA layer (factors, DoRA magnitudes), in network order."""
    return [p for _, layer in lora_layers(network) for p in layer.lora_parameters()]


def lora_state_dict(network: nn.Cell) -> dict[str, np.ndarray]:
    """``{<module>.lora_down.weight: [r, in], <module>.lora_up.weight: [out, r]}`` (and DoRA's
    ``<module>.dora_scale``) as float32 numpy arrays."""
    return {p.name: p.asnumpy() for _, layer in lora_layers(network) for p in layer.lora_parameters()}


def lora_modules(network: nn.Cell) -> dict[str, Module]:
    """``{module name: Module(down, up, alpha)}`` of every LoRA layer, float32 numpy arrays (the adapter's view)."""
    return {
        name: Module(layer.lora_down.weight.asnumpy(), layer.lora_up.weight.asnumpy(), layer.alpha)
        for name, layer in lora_layers(network)
    }


def load_lora_state_dict(network: nn.Cell, state_dict: dict, alphas: dict[str, float] | None = None) -> None:
    """Copy LoRA weights into ``network`` by exact parameter name (never MindSpore's prefix guessing).

    Every LoRA parameter must be present and nothing else may be; shapes must match. ``alphas`` (``{module: alpha}``)
    sets each module's alpha, so an adapter trained with another alpha keeps its strength. Raises
    ``KeyError``/``ValueError`` naming the offending keys.
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
    unknown = sorted(set(alphas or {}) - set(layers))
    if unknown:
        raise KeyError(f"LoRA alphas name module {unknown[0]}, which the network does not have")
    for name, param in params.items():
        assign_array(param, values[name])
    for name, alpha in (alphas or {}).items():
        layers[name].set_alpha(float(alpha))


def to_adapter(network: nn.Cell, family: str, **meta) -> Adapter:
    """The adapter of an injected network (its LoRA weights, DoRA magnitudes and per-module alphas); ``meta`` adds
    e.g. ``context_dim`` and ``parameterization``."""
    magnitudes = {name: layer.dora_scale.asnumpy() for name, layer in lora_layers(network) if layer.use_dora}
    return make_adapter(lora_modules(network), {"family": family, **meta}, magnitudes)


def load_adapter(network: nn.Cell, adapter: Adapter, source="adapter") -> None:
    """Load an :class:`~ldm.lora.adapter.Adapter` into an injected network (weights, DoRA magnitudes and per-module
    alphas). LoHa/LoKr modules have no layer here: merge them (:func:`ldm.lora.merge.apply_adapters`)."""
    mods, magnitudes, products = parse(adapter, source)
    if products:
        kind, _, _ = next(iter(products.values()))
        raise ValueError(f"{source}: {kind} modules cannot be loaded into LoRA layers; merge them into the weights")
    state = {
        path + suffix: array
        for path, (down, up, _) in mods.items()
        for suffix, array in ((".lora_down.weight", down), (".lora_up.weight", up))
    }
    state.update({path + MAGNITUDE: m for path, m in magnitudes.items()})
    load_lora_state_dict(network, state, {path: alpha for path, (_, _, alpha) in mods.items()})


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
