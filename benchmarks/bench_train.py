"""Time of one LoRA training step on the UNet: our compiled ``TrainStep`` against torch + peft, same batch and weights.

Both sides train rank-4 LoRA on ``to_q/to_k/to_v/to_out.0`` of the same UNet (built by ``bench_models``, converted
into ours), with the same adapter initialisation (peft's ``lora_A`` copied into our ``lora_down``, both ``up``
zero), the eps-prediction MSE on q_sample'd latents, global-norm clipping at 1.0 and AdamW (lr 1e-4, weight decay
1e-2). The batch (clean latents, context, timesteps, noise) is fixed, so the two loss curves must agree; the VAE and
text encoder are not part of the step (their forward time is in ``bench_models``). Steps are interleaved (torch,
ours, torch, ...) so both see the same machine load. Run:

    .venv/bin/python benchmarks/bench_train.py [--size tiny|small] [--steps 6] [--batch 2] [--threads 2]
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import argparse
import os
import statistics
import time

import mindspore as ms
import numpy as np
import torch

from bench_models import SIZES, TEXT_LENGTH, build_reference, convert, load_average
from ldm.env import init_env
from ldm.io import unet_keys
from ldm.lora import UNET_ATTENTION_TARGETS, inject_lora, lora_layers
from ldm.names import UNET_PREFIX
from ldm.train.losses import DiffusionLoss
from ldm.train.step import TrainStep

RANK = 4
LR = 1e-4
WEIGHT_DECAY = 1e-2


def torch_trainer(unet, alphas_cumprod: np.ndarray, batch):
    """A closure running one peft LoRA step on ``batch``; returns the loss."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=list(UNET_ATTENTION_TARGETS))
    )
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    ab = torch.from_numpy(alphas_cumprod.astype(np.float32))
    x0, ctx, t, noise = (torch.from_numpy(a) for a in batch)
    t = t.long()
    a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)

    def step() -> float:
        pred = unet(a * x0 + s * noise, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()

    return step, sum(p.numel() for p in params)


def copy_adapter(unet, model, layout: dict) -> int:
    """Copy peft's ``lora_A``/``lora_B`` of every adapted module into our ``lora_down``/``lora_up``."""
    peft = {k: v.detach().numpy() for k, v in unet.state_dict().items() if ".lora_" in k}
    ours = dict(lora_layers(model))
    copied = 0
    for key, value in peft.items():
        module, rest = key.split(".lora_")
        mapped = unet_keys.diffusers_to_ldm({module + ".weight": value}, **layout)
        ((name, array),) = mapped.items()
        layer = ours[UNET_PREFIX + name[: -len(".weight")]]
        target = layer.lora_down.weight if rest.startswith("A.") else layer.lora_up.weight
        target.set_data(ms.Tensor(array.copy()))
        copied += 1
    if copied != 2 * len(ours):
        raise RuntimeError(f"copied {copied} adapter tensors, expected {2 * len(ours)}")
    return copied


def build_train_pair(size: str, batch: int):
    """(torch step, our step, description) on the same UNet, adapter and fixed batch; each step returns the loss."""
    unet, vae, text = build_reference(size)
    model, config = convert(unet, vae, text)
    spec = SIZES[size]
    rng = np.random.default_rng(0)
    b, n = batch, spec["latent"]
    arrays = (
        rng.standard_normal((b, 4, n, n), dtype=np.float32),
        rng.standard_normal((b, TEXT_LENGTH, spec["text"]["hidden_size"]), dtype=np.float32),
        rng.integers(0, 1000, b).astype(np.int32),
        rng.standard_normal((b, 4, n, n), dtype=np.float32),
    )
    torch_step, n_params = torch_trainer(unet, model.alphas_cumprod, arrays)
    inject_lora(model.model, targets=UNET_ATTENTION_TARGETS, rank=RANK)
    p = config["model"]["params"]["unet_config"]["params"]
    layout = {k: p[k] for k in ("num_res_blocks", "channel_mult", "attention_resolutions")}
    copy_adapter(unet, model, layout)
    params = [q for q in model.get_parameters() if q.requires_grad]
    loss_net = DiffusionLoss(model.model, model.alphas_cumprod, model.parameterization)
    ms_step = TrainStep(loss_net, params, LR, weight_decay=WEIGHT_DECAY, max_grad_norm=1.0)
    inputs = [ms.Tensor(a) for a in arrays] + [ms.Tensor(np.zeros((b, 4, 1, 1), np.float32))]
    ours = lambda: ms_step(*inputs).loss  # noqa: E731
    described = (
        f"size={size}, batch {b}, latents {n}x{n}, LoRA rank {RANK} on {'/'.join(UNET_ATTENTION_TARGETS)} "
        f"({n_params} trainable in torch, {sum(q.size for q in params)} in ours)"
    )
    return torch_step, ours, described


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=6, help="timed steps after the first (compiling) one")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks")
    args = parser.parse_args()
    init_env("CPU", mode=0, threads=args.threads)
    torch.set_num_threads(args.threads)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    torch_step, ours, described = build_train_pair(args.size, args.batch)
    b = args.batch
    print(f"{described}, {args.threads} threads, ONEDNN_MAX_CPU_ISA={isa}, load average {load_average()}")
    start = time.perf_counter()
    losses = [(torch_step(), None)]
    first_torch = time.perf_counter() - start
    start = time.perf_counter()
    losses[0] = (losses[0][0], ours())
    first_ours = time.perf_counter() - start
    rows = []
    for _ in range(args.steps):
        start = time.perf_counter()
        lt = torch_step()
        mid = time.perf_counter()
        lm = ours()
        end = time.perf_counter()
        rows.append((mid - start, end - mid))
        losses.append((lt, lm))
    med_torch = statistics.median(r[0] for r in rows)
    med_ours = statistics.median(r[1] for r in rows)
    ratio = statistics.median(o / t for t, o in rows)
    drift = max(abs(lm - lt) / abs(lt) for lt, lm in losses)
    print(f"{'':<22} {'first step s':>12} {'median step s':>13} {'img/s':>7}")
    print(f"{'torch + peft (eager)':<22} {first_torch:12.2f} {med_torch:13.3f} {b / med_torch:7.2f}")
    print(f"{'ours (TrainStep, jit)':<22} {first_ours:12.2f} {med_ours:13.3f} {b / med_ours:7.2f}")
    print(f"ours/torch step time (median of per-step ratios): {ratio:.2f}")
    print(f"losses torch/ours: {' '.join(f'{lt:.5f}/{lm:.5f}' for lt, lm in losses)}")
    print(f"max relative loss difference over {len(losses)} steps: {drift:.1e}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
