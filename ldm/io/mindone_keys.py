"""mindone's MindSpore Stable Diffusion checkpoints (``examples/stable_diffusion_v2``) -> our original-LDM names.

mindone keeps the LDM block layout but names MindSpore-style: norms ``gamma``/``beta``, ``embedding_table``,
convolutions wrapped in one more cell (``op.conv``, ``skip_connection.conv``, ``in_layers_conv.conv``...), ResBlock
sequences split into ``in_layers_norm``/``in_layers_conv``, and a text encoder of its own
(``cond_stage_model.transformer.transformer_layer.resblocks.N`` with a fused ``attn.attn.in_proj`` for SD1 as well
as SD2). Shapes are the same as PyTorch's, so conversion is renaming plus, for SD1, splitting the fused attention
input projection into HF CLIP's q/k/v. A key that fits no rule raises KeyError naming it.
"""

from __future__ import annotations

import re

import numpy as np

from ldm.names import check_family

TEXT_PREFIX = "cond_stage_model.transformer."

# UNet/VAE renames on the module path, applied in order (patterns use the mindone spelling).
_MODULE_RULES = (
    (re.compile(r"\.(in|out)_layers_norm$"), lambda m: f".{m.group(1)}_layers.0"),
    (re.compile(r"\.in_layers_conv\.conv$"), lambda m: ".in_layers.2"),
    (re.compile(r"\.out_layers_conv\.conv$"), lambda m: ".out_layers.3"),
    (re.compile(r"\.(skip_connection|op)\.conv$"), lambda m: f".{m.group(1)}"),
    (re.compile(r"^(model\.diffusion_model\.input_blocks\.0\.0)\.conv$"), lambda m: m.group(1)),
    (re.compile(r"^(model\.diffusion_model\.output_blocks\.\d+\.\d+\.conv)\.conv$"), lambda m: m.group(1)),
    (re.compile(r"^(model\.diffusion_model\.out\.2)\.conv$"), lambda m: m.group(1)),
)
_LEAF = {"gamma": "weight", "beta": "bias", "weight": "weight", "bias": "bias"}
_TEXT_BLOCK = re.compile(r"transformer_layer\.resblocks\.(\d+)\.(.+)")
_SD2_BLOCK = {
    "ln_1.gamma": "ln_1.weight", "ln_1.beta": "ln_1.bias", "ln_2.gamma": "ln_2.weight", "ln_2.beta": "ln_2.bias",
    "attn.attn.in_proj.weight": "attn.in_proj_weight", "attn.attn.in_proj.bias": "attn.in_proj_bias",
    "attn.attn.out_proj.weight": "attn.out_proj.weight", "attn.attn.out_proj.bias": "attn.out_proj.bias",
    "c_fc.weight": "mlp.c_fc.weight", "c_fc.bias": "mlp.c_fc.bias",
    "c_proj.weight": "mlp.c_proj.weight", "c_proj.bias": "mlp.c_proj.bias",
}  # fmt: skip
_SD1_BLOCK = {
    "ln_1.gamma": "layer_norm1.weight", "ln_1.beta": "layer_norm1.bias",
    "ln_2.gamma": "layer_norm2.weight", "ln_2.beta": "layer_norm2.bias",
    "attn.attn.out_proj.weight": "self_attn.out_proj.weight", "attn.attn.out_proj.bias": "self_attn.out_proj.bias",
    "c_fc.weight": "mlp.fc1.weight", "c_fc.bias": "mlp.fc1.bias",
    "c_proj.weight": "mlp.fc2.weight", "c_proj.bias": "mlp.fc2.bias",
}  # fmt: skip
_TEXT_TOP = {
    "sd1": {"embedding_table": "text_model.embeddings.token_embedding.weight",
            "positional_embedding": "text_model.embeddings.position_embedding.weight",
            "ln_final.gamma": "text_model.final_layer_norm.weight",
            "ln_final.beta": "text_model.final_layer_norm.bias"},
    "sd2": {"embedding_table": "model.token_embedding.weight", "positional_embedding": "model.positional_embedding",
            "ln_final.gamma": "model.ln_final.weight", "ln_final.beta": "model.ln_final.bias"},
}  # fmt: skip


def is_mindone_state_dict(state_dict) -> bool:
    """mindone files are recognisable by MindSpore parameter names (embedding table, gamma/beta norms)."""
    return any(k == TEXT_PREFIX + "embedding_table" or k.endswith(".gamma") for k in state_dict)


def _rename_module(key: str) -> str:
    module, _, leaf = key.rpartition(".")
    if leaf not in _LEAF:
        raise KeyError(f"unknown mindone key {key!r}")
    for pattern, repl in _MODULE_RULES:
        module = pattern.sub(repl, module)
    return f"{module}.{_LEAF[leaf]}"


def _text_key(rest: str, value: np.ndarray, family: str) -> dict[str, np.ndarray]:
    if rest in _TEXT_TOP[family]:
        return {_TEXT_TOP[family][rest]: value}
    match = _TEXT_BLOCK.fullmatch(rest)
    if match is None:
        raise KeyError(f"unknown mindone text-encoder key {TEXT_PREFIX + rest!r}")
    i, name = match.groups()
    if family == "sd2":
        if name not in _SD2_BLOCK:
            raise KeyError(f"unknown mindone text-encoder key {TEXT_PREFIX + rest!r}")
        return {f"model.transformer.resblocks.{i}.{_SD2_BLOCK[name]}": value}
    layer = f"text_model.encoder.layers.{i}."
    if name in ("attn.attn.in_proj.weight", "attn.attn.in_proj.bias"):
        leaf = name.rsplit(".", 1)[1]
        q, k, v = np.split(np.asarray(value), 3, axis=0)
        return {f"{layer}self_attn.{p}_proj.{leaf}": part for p, part in zip("qkv", (q, k, v))}
    if name not in _SD1_BLOCK:
        raise KeyError(f"unknown mindone text-encoder key {TEXT_PREFIX + rest!r}")
    return {layer + _SD1_BLOCK[name]: value}


def mindone_to_ldm(state_dict: dict[str, np.ndarray], family: str) -> dict[str, np.ndarray]:
    """Full mindone state dict -> our full names (``family`` "sd1" or "sd2" picks the text-encoder layout)."""
    check_family(family)
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key.startswith(TEXT_PREFIX):
            converted = _text_key(key[len(TEXT_PREFIX) :], value, family)
            converted = {"cond_stage_model." + ("transformer." if family == "sd1" else "") + k: v
                         for k, v in converted.items()}  # fmt: skip
        else:
            converted = {_rename_module(key): value}
        for new_key, new_value in converted.items():
            if new_key in out:
                raise KeyError(f"mindone keys collide on {new_key!r} (from {key!r})")
            out[new_key] = new_value
    return out
