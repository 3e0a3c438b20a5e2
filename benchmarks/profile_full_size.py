"""Where the full-size SD2 512px LoRA step spends its time: oneDNN's kernels in ours, torch's profiler in diffusers.

Our side is the training CLI as ``bench_full_size.py`` runs it (v2 recipe, cached latents and text embeddings,
``--use_recompute False``, batch 1), twice with ``ONEDNN_VERBOSE=1``: one step, then ``1 + --steps`` steps; the
difference of oneDNN's logged execution times between the two runs is what the later steps spent in oneDNN
(convolutions and matmuls, per primitive and direction), and the rest of the step time (``metrics.jsonl``) is every
other kernel plus MindSpore's op-by-op dispatch (full-size CPU runs are PyNative, see the README). The diffusers side
is the same UNet step (diffusers UNet + peft LoRA on ``to_q/to_k/to_v/to_out.0``, AdamW, clipping) on precomputed
latents and text embeddings, one warm-up step, then one step under ``torch.profiler``, self CPU time grouped the same
way. The ``attention`` part times one self-attention at 64x64 latents alone, forward + backward, in each
framework. Both use the weights ``bench_full_size.py`` prepares in ``--work`` (made there if missing). Run alone:

    python benchmarks/profile_full_size.py --work /tmp/fullsize [--parts step,attention] [--steps 2] [--threads 2]
"""

import ldm  # noqa: F401, I001  (CPU defaults before mindspore)
import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

from bench_full_size import PROMPT, child_json, peft_lora_step, prepare, run_child
from probe_isa import onednn_exec_records

# torch operators by what they compute (self CPU time; anything else is "other")
TORCH_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward"),
    "attention (fused)": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "group/layer norm": (
        "aten::native_group_norm",
        "aten::native_group_norm_backward",
        "aten::native_layer_norm",
        "aten::native_layer_norm_backward",
    ),
}


def onednn_totals(log: str) -> dict[str, float]:
    """{"<primitive> <direction> (<implementation>)": total exec ms} over a oneDNN verbose log."""
    totals = collections.defaultdict(float)
    for primitive, direction, impl, ms in onednn_exec_records(log):
        totals[f"{primitive} {direction} ({impl})"] += ms
    return dict(totals)


def ours_run(paths: dict, work: Path, steps: int) -> dict:
    out = work / f"profile-ours-{steps}"
    cmd = [sys.executable, "examples/stable_diffusion_v2/train_text_to_image.py"]
    cmd += ["--train_config", "configs/train/train_config_lora_v2.yaml", "--data_path", str(paths["data"])]
    cmd += ["--output_path", str(out), "--pretrained_model_path", str(paths["weights"]), "--train_batch_size", "1"]
    cmd += ["--max_train_steps", str(steps), "--use_ema", "False", "--use_recompute", "False"]
    cmd += ["--cache_latents", "True", "--cache_text_embeddings", "True"]
    os.environ["ONEDNN_VERBOSE"] = "1"
    try:
        result = run_child(cmd, f"ours, {steps} steps")
    finally:
        del os.environ["ONEDNN_VERBOSE"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"onednn": onednn_totals(result["stdout"]), "step_s": [m["step_time_s"] for m in metrics]}


def torch_child(args) -> None:
    """One profiled diffusers + peft UNet step after a warm-up step; prints {operator: self ms} and the step time."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from ldm.tokenizer import CLIPTokenizer

    torch.set_num_threads(args.threads)
    folder = Path(args.work) / "sd2-base-diffusers"
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        ids = torch.from_numpy(np.asarray(CLIPTokenizer.for_family("sd2")([PROMPT]), dtype=np.int64))
        context = CLIPTextModel.from_pretrained(folder / "text_encoder")(ids)[0]
    lora_step = peft_lora_step(unet)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, 64, 64), generator=gen)

    def step():
        lora_step(latents, context, gen)

    step()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - start
    ops = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
    print(json.dumps({"step_s": wall, "ops_ms": ops}))


ATTENTION_SHAPE = (5, 4096, 64)  # (batch x heads, tokens, head size) of SD2's self-attention at 64x64 latents


def attention_child(args) -> None:
    """One such self-attention, forward + backward, median of 3 after a warm-up: torch's fused kernel, or ours as
    the v2 recipe runs it (``MemoryEfficientAttention`` in PyNative); prints the seconds as JSON."""
    import numpy as np

    rng = np.random.default_rng(0)
    q, k, v, grad = (rng.standard_normal(ATTENTION_SHAPE, dtype=np.float32) for _ in range(4))
    q *= ATTENTION_SHAPE[-1] ** -0.5  # the scale is folded into q, as our CrossAttention does
    if args.attention_child == "torch":
        import torch

        torch.set_num_threads(args.threads)
        tq, tk, tv, tg = (torch.from_numpy(a).unsqueeze(0) for a in (q, k, v, grad))

        def call():
            leaves = [t.clone().requires_grad_(True) for t in (tq, tk, tv)]
            torch.nn.functional.scaled_dot_product_attention(*leaves, scale=1.0).backward(tg)

    else:
        import mindspore as ms

        from ldm.env import init_env
        from ldm.models.attention import MemoryEfficientAttention

        init_env("CPU", mode=1)
        cell = MemoryEfficientAttention()
        mq, mk, mv, mg = (ms.Tensor(a) for a in (q, k, v, grad))

        def call():
            ms.vjp(cell, mq, mk, mv)[1](mg)[0].asnumpy()

    call()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    print(json.dumps({"s": sorted(times)[1]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder of bench_full_size.py's weights and data (the step part)")
    parser.add_argument("--parts", default="step,attention", help="step (the training step), attention, or both")
    parser.add_argument("--steps", type=int, default=2, help="later steps profiled on our side")
    parser.add_argument("--threads", type=int, default=2, help="torch's threads (ours: the CLI's default, the CPUs)")
    parser.add_argument("--torch_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--attention_child", choices=["torch", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        return torch_child(args)
    if args.attention_child:
        return attention_child(args)
    parts = args.parts.split(",")
    if not set(parts) <= {"step", "attention"}:
        parser.error(f"--parts: expected step and/or attention, got {args.parts!r}")
    if "step" in parts:
        if not args.work:
            parser.error("the step part needs --work")
        profile_step(Path(args.work), args)
    if "attention" in parts:
        attention = {}
        for side in ("torch", "ours"):
            cmd = [sys.executable, __file__, "--attention_child", side, "--threads", str(args.threads)]
            attention[side] = child_json(run_child(cmd, f"attention, {side}"))["s"]
        print(
            f"one self-attention at 64x64 latents {ATTENTION_SHAPE}, forward + backward (SD2's UNet has five per "
            f"step): ours {attention['ours']:.2f} s, torch {attention['torch']:.2f} s"
        )


def profile_step(work: Path, args) -> None:
    paths = prepare(work)
    one, more = ours_run(paths, work, 1), ours_run(paths, work, 1 + args.steps)
    ours_step = sum(more["step_s"][1:]) / args.steps
    ours = {k: (v - one["onednn"].get(k, 0.0)) / args.steps / 1000 for k, v in more["onednn"].items()}
    ours = {k: v for k, v in sorted(ours.items(), key=lambda kv: -kv[1]) if v > 0.05}
    cmd = [sys.executable, __file__, "--torch_child", "--work", str(work), "--threads", str(args.threads)]
    ref = child_json(run_child(cmd, "diffusers + peft"))
    groups = collections.defaultdict(float)
    for name, ms in ref["ops_ms"].items():
        group = next((g for g, names in TORCH_GROUPS.items() if name in names), "other")
        groups[group] += ms / 1000

    print(f"ours: v2 recipe, cached, recompute off, batch 1, mean of {args.steps} later steps: {ours_step:.1f} s")
    for name, seconds in ours.items():
        print(f"  oneDNN {name:<58} {seconds:7.1f} s  {seconds / ours_step:6.1%}")
    in_onednn = sum(ours.values())
    rest = ours_step - in_onednn
    print(f"  {'every other kernel + dispatch':<65} {rest:7.1f} s  {rest / ours_step:6.1%}")
    print(f"diffusers + peft, one profiled UNet step: {ref['step_s']:.1f} s (self CPU time by operator group)")
    for name, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<65} {seconds:7.1f} s  {seconds / ref['step_s']:6.1%}")
    print(f"ratio_step={ours_step / ref['step_s']:.2f} onednn_s={in_onednn:.1f} rest_s={rest:.1f}")


if __name__ == "__main__":
    main()
