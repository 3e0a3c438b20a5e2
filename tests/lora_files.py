"""Shared by the LoRA tests: shapes of the tiny configs' LoRA-able layers, random adapters, delta comparisons."""

import numpy as np

from ldm.lora.adapter import delta_weight, make_adapter, modules
from ldm.lora.interop import UNetLayout

# ldm/configs/tiny/sd{1,2}-tiny.yaml: model_channels 32, channel_mult [1, 2], num_res_blocks 1, attention [2, 1],
# context_dim 32, text width 32 with 2 layers.
LAYOUT = UNetLayout(num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(2, 1))
BLOCK_CHANNELS = {
    "input_blocks.1.1": 32,
    "input_blocks.3.1": 64,
    "middle_block.1": 64,
    "output_blocks.0.1": 64,
    "output_blocks.1.1": 64,
    "output_blocks.2.1": 32,
    "output_blocks.3.1": 32,
}
CTX, WIDTH = 32, 32


def unet_shapes(extended=True):
    """[out, in] of every LoRA-able Linear of the tiny UNet (proj_in/out included: 1x1 convs for SD1)."""
    shapes = {}
    for block, c in BLOCK_CHANNELS.items():
        p = f"model.diffusion_model.{block}."
        t = p + "transformer_blocks.0."
        for a in ("attn1", "attn2"):
            shapes[f"{t}{a}.to_q"] = (c, c)
            shapes[f"{t}{a}.to_k"] = (c, c if a == "attn1" else CTX)
            shapes[f"{t}{a}.to_v"] = (c, c if a == "attn1" else CTX)
            shapes[f"{t}{a}.to_out.0"] = (c, c)
        if extended:
            shapes[t + "ff.net.0.proj"] = (8 * c, c)
            shapes[t + "ff.net.2"] = (c, 4 * c)
            shapes[p + "proj_in"] = (c, c)
            shapes[p + "proj_out"] = (c, c)
    return shapes


def te_shapes(family):
    shapes = {}
    for i in range(2):
        if family == "sd1":
            p = f"cond_stage_model.transformer.text_model.encoder.layers.{i}."
            shapes.update({p + f"self_attn.{n}_proj": (WIDTH, WIDTH) for n in "qkvo"})
            shapes[p + "self_attn.out_proj"] = shapes.pop(p + "self_attn.o_proj")
            shapes[p + "mlp.fc1"], shapes[p + "mlp.fc2"] = (4 * WIDTH, WIDTH), (WIDTH, 4 * WIDTH)
        else:
            p = f"cond_stage_model.model.transformer.resblocks.{i}."
            shapes[p + "attn.in_proj_lora"] = (3 * WIDTH, WIDTH)
            shapes[p + "attn.out_proj"] = (WIDTH, WIDTH)
            shapes[p + "mlp.c_fc"], shapes[p + "mlp.c_proj"] = (4 * WIDTH, WIDTH), (WIDTH, 4 * WIDTH)
    return shapes


def random_adapter(family, rng, rank=4, alpha=2.0, mixed=True, shapes=None):
    """Random factors; with ``mixed`` every third module gets another rank and alpha (kohya-style per module)."""
    shapes = shapes or {**unet_shapes(), **te_shapes(family)}
    mods = {}
    for i, (path, (out, inp)) in enumerate(sorted(shapes.items())):
        r, a = (rank + 2, 1.0) if mixed and i % 3 == 0 else (rank, alpha)
        mods[path] = (rng.normal(size=(r, inp)).astype(np.float32), rng.normal(size=(out, r)).astype(np.float32), a)
    return make_adapter(mods, {"family": family, "context_dim": CTX, "parameterization": "eps"})


def deltas(adapter):
    return {p: delta_weight(*m) for p, m in modules(adapter).items()}


def assert_same_deltas(a, b, rtol=0.0):
    da, db = deltas(a), deltas(b)
    assert sorted(da) == sorted(db)
    for path in da:
        np.testing.assert_allclose(db[path], da[path], rtol=rtol, atol=rtol * np.abs(da[path]).max(), err_msg=path)


def assert_same_factors(a, b):
    """Same modules with bitwise-equal factors and equal alphas."""
    ma, mb = modules(a), modules(b)
    assert sorted(ma) == sorted(mb)
    for path, (down, up, alpha) in ma.items():
        np.testing.assert_array_equal(mb[path].down, down, err_msg=path)
        np.testing.assert_array_equal(mb[path].up, up, err_msg=path)
        assert mb[path].alpha == alpha, path
