"""Acceptance: the DreamBooth prior-preservation loss matches diffusers' ``train_dreambooth_lora.py`` on identical
weights and batches, square and of an aspect-ratio bucket's shape (a bucketed DreamBooth batch is B instance and B
class rows of one non-square resolution).

Reference: the loss of that script written out in torch on the tiny diffusers UNet with a peft LoRA adapter
(``test_lora_grad_parity.build_pair``: the same base and LoRA weights on both sides): the batch is the instance
examples then the class examples, the prediction and the target are split with ``torch.chunk(.., 2)``, each half's
MSE is taken with ``reduction="mean"``, and ``loss + prior_loss_weight * prior_loss`` is differentiated. Ours:
``PriorPreservationLoss`` (per-sample losses, each half's mean) under ``mindspore.value_and_grad`` over the LoRA
weights. Both get the same latents, text contexts, timesteps and noise; ``prior_loss_weight`` is 0.3, so a swapped
or unweighted half changes the result.

Tolerance: the same float32 math in a different operation order, as in ``test_lora_grad_parity`` (whose bounds and
their reasons apply unchanged): |loss - ref| / |ref| <= 1e-5 for the total and each term, and per LoRA tensor
max|grad - ref| / max|ref| <= 1e-4.
"""

import ldm  # noqa: F401, I001  (must precede mindspore)

import mindspore as ms
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_lora_grad_parity import GRAD_RTOL, LOSS_RTOL, build_pair, rel_err

from ldm.train.losses import PriorPreservationLoss

PRIOR_LOSS_WEIGHT = 0.3
INSTANCE_T, CLASS_T = (40, 700), (300, 950)


def batch(context_dim, latent_hw=(8, 8)):
    """Two instance rows then two class rows: latents, contexts (instance/class prompts differ), timesteps, noise."""
    r = np.random.default_rng(7)
    x0 = r.standard_normal((4, 4, *latent_hw)).astype(np.float32)
    instance_ctx, class_ctx = r.standard_normal((2, 1, 5, context_dim)).astype(np.float32)
    context = np.concatenate([np.repeat(instance_ctx, 2, 0), np.repeat(class_ctx, 2, 0)])
    noise = r.standard_normal(x0.shape).astype(np.float32)
    return x0, context, np.array(INSTANCE_T + CLASS_T, np.int64), noise


def reference(pair, x0, context, timesteps, noise):
    """(loss, instance loss, prior loss, grads) as ``train_dreambooth_lora.py`` computes them (epsilon target)."""
    x0, context, timesteps, noise = (torch.from_numpy(v) for v in (x0, context, timesteps, noise))
    noisy = pair.scheduler.add_noise(x0, noise, timesteps)
    model_pred = pair.ref(noisy, timesteps, context, return_dict=False)[0]
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(noise, 2, dim=0)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    total = loss + PRIOR_LOSS_WEIGHT * prior_loss
    params = [p for ab in pair.ref_lora.values() for p in ab]
    grads = [g.numpy().copy() for g in torch.autograd.grad(total, params)]
    per_module = {name: (grads[2 * i], grads[2 * i + 1]) for i, name in enumerate(pair.ref_lora)}
    return float(total.detach()), float(loss.detach()), float(prior_loss.detach()), per_module


def ours(pair, x0, context, timesteps, noise):
    loss_cell = PriorPreservationLoss(pair.ours, pair.alphas_cumprod, "eps", prior_loss_weight=PRIOR_LOSS_WEIGHT)
    weights = [p for layer in pair.layers.values() for p in layer.lora_parameters()]
    grad_fn = ms.value_and_grad(loss_cell, grad_position=None, weights=weights, has_aux=True)
    offset = np.zeros((4, 4, 1, 1), np.float32)
    inputs = (x0, context, timesteps.astype(np.int32), noise, offset)
    (total, parts), grads = grad_fn(*(ms.Tensor(v) for v in inputs))
    grads = [g.asnumpy() for g in grads]
    per_module = {name: (grads[2 * i], grads[2 * i + 1]) for i, name in enumerate(pair.layers)}
    instance, prior = parts.asnumpy().tolist()
    return float(total.asnumpy()), instance, prior, per_module


@pytest.fixture(scope="module")
def pair():
    return build_pair("sd1")


@pytest.mark.parametrize("latent_hw", [(8, 8), (8, 12)], ids=["square", "bucket"])
def test_prior_preservation_loss_and_grads_match_diffusers(pair, latent_hw):
    inputs = batch(pair.ref.config.cross_attention_dim, latent_hw)
    ref_total, ref_instance, ref_prior, ref_grads = reference(pair, *inputs)
    total, instance, prior, grads = ours(pair, *inputs)
    print(f"loss {ref_total:.6f} = {ref_instance:.6f} + {PRIOR_LOSS_WEIGHT} * {ref_prior:.6f}; ours {total:.6f}")
    assert abs(ref_instance - ref_prior) > 100 * LOSS_RTOL * abs(ref_total)  # swapping the halves would show
    for value, ref in ((total, ref_total), (instance, ref_instance), (prior, ref_prior)):
        assert abs(value - ref) / abs(ref) <= LOSS_RTOL
    worst = max(
        max(rel_err(grads[pair.module_map[name]][0], ga), rel_err(grads[pair.module_map[name]][1], gb))
        for name, (ga, gb) in ref_grads.items()
    )
    print(f"LoRA grads max rel err {worst:.1e}")
    assert worst <= GRAD_RTOL
