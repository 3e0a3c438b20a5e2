"""The compiled training step: loss scaling, gradient accumulation, data-parallel mean, clipping, AdamW, EMA.

``TrainStep`` wraps any loss Cell (``loss_net(*inputs) -> scalar``, e.g. ``DiffusionLoss``, or ``(scalar, terms)``
when it names its terms in ``loss_parts``, e.g. ``PriorPreservationLoss``) and the list of
parameters to train. It never uses ``nn.TrainOneStepWithLossScaleCell`` (it fails on CPU); instead two compiled steps
(Cells owning their parameters, see ``_CompiledStep``) are built around ``mindspore.value_and_grad`` over the
trainable parameters only:

- ``accumulate`` (micro-steps 1..N-1 of an update): add the unscaled gradients to float32 accumulators;
- ``update`` (micro-step N): add the last gradients, average over N, mean over data-parallel ranks, check that they
  are all finite, adjust the loss scale, clip to ``max_grad_norm``, take an AdamW step, update the EMA.

On a non-finite update nothing but the loss scale and ``global_step`` changes: parameters, moments, the AdamW
bias-correction count and the EMA are kept by ``select`` (no graph control flow), so the skip is exact. The learning
rate is looked up per optimizer update (``global_step`` counts update boundaries, skipped ones included, like
mindone, so the schedule's length is the number of updates).

The optimizer is an AdamW with PyTorch semantics (bias correction, decoupled weight decay) written here rather than
``nn.AdamWeightDecay``, which has no bias correction and so would not match diffusers' runs, and whose in-place
update cannot be masked on overflow without graph control flow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ldm.models.layers import assign_array
from ldm.train.ema import EMA
from ldm.train.loss_scaling import load_scaler_state, make_loss_scaler, scaler_parameters, scaler_state


def no_decay_default(name: str, param: Parameter) -> bool:
    """Parameters that get no weight decay: biases, norm weights and any other 1-D tensor."""
    lowered = name.lower()
    return len(param.shape) <= 1 or lowered.endswith(".bias") or "norm" in lowered


def _flat(x):
    x = x.reshape(-1)
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


_HYPER_MAP = ops.HyperMap()


def flatten_float32(tensors):
    """Tensors as one float32 vector, in order (the layout of ``AdamW``'s flat moments)."""
    return ops.cat(_HYPER_MAP(_flat, tensors))


def _write_back(flat, param, start, end):
    value = flat[start:end].reshape(param.shape)
    return ops.assign(param, value if param.dtype == ms.float32 else value.astype(param.dtype))


class AdamW(nn.Cell):
    """torch.optim.AdamW as a Cell: ``construct(grad, lr, apply)`` updates params and moments where ``apply``;
    ``grad`` is the gradients of all parameters as one float32 vector (``flatten_float32(grads)``).

    The update runs once over all parameters concatenated into one float32 vector (moments stored that way, weight
    decay as a per-element vector), then splits the new values back into the parameters: a handful of kernels and
    graph nodes instead of a dozen per parameter tensor (the LoRA step has hundreds; see ``benchmarks/README.md``,
    "Compile time"). ``moment_arrays``/``load_moment_arrays`` give the moments per parameter as ``adam_m.<name>`` /
    ``adam_v.<name>``; ``adam_step`` counts applied updates (bias correction). ``no_decay(name, param)`` selects
    the parameters whose weight decay is 0. ``lr_scales`` (one factor per parameter, or None) gives parameter groups
    their own learning rate: ``lr * factor`` in the step and in the decoupled decay (e.g. ``text_encoder_lr``).
    """

    def __init__(
        self,
        params: Sequence[Parameter],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        no_decay: Callable[[str, Parameter], bool] = no_decay_default,
        lr_scales: Sequence[float] | None = None,
    ):
        super().__init__()
        self.params = ParameterTuple(params)
        self.sizes = tuple(int(p.size) for p in self.params)
        total = sum(self.sizes)
        self.ends = tuple(int(e) for e in np.cumsum(self.sizes))
        self.starts = (0, *self.ends[:-1])
        self.exp_avg = Parameter(Tensor(np.zeros(total, np.float32)), name="adam_m", requires_grad=False)
        self.exp_avg_sq = Parameter(Tensor(np.zeros(total, np.float32)), name="adam_v", requires_grad=False)
        self.step = Parameter(Tensor(0, ms.int32), name="adam_step", requires_grad=False)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        decays = [0.0 if no_decay(p.name, p) else float(weight_decay) for p in self.params]
        self.weight_decay = Tensor(np.repeat(np.array(decays, np.float32), self.sizes))
        self.grouped = lr_scales is not None
        if self.grouped:
            if len(lr_scales) != len(self.params):
                raise ValueError(f"{len(lr_scales)} learning-rate factors for {len(self.params)} parameters")
            self.lr_scale = Tensor(np.repeat(np.asarray(lr_scales, np.float32), self.sizes))
        self.hyper_map = ops.HyperMap()

    def construct(self, grad, lr, apply):
        step = self.step + apply.astype(ms.int32)
        ops.assign(self.step, step)
        stepf = ops.maximum(step, 1).astype(ms.float32)
        bc1 = 1.0 - ops.pow(ops.scalar_to_tensor(self.beta1, ms.float32), stepf)
        bc2_sqrt = ops.sqrt(1.0 - ops.pow(ops.scalar_to_tensor(self.beta2, ms.float32), stepf))
        param = flatten_float32(self.params)
        if self.grouped:
            lr = lr * self.lr_scale
        m_new = self.exp_avg * self.beta1 + grad * (1.0 - self.beta1)
        v_new = self.exp_avg_sq * self.beta2 + ops.square(grad) * (1.0 - self.beta2)
        p_new = param * (1.0 - lr * self.weight_decay)
        p_new = p_new - (lr / bc1) * m_new / (ops.sqrt(v_new) / bc2_sqrt + self.eps)
        ops.assign(self.exp_avg, ops.select(apply, m_new, self.exp_avg))
        ops.assign(self.exp_avg_sq, ops.select(apply, v_new, self.exp_avg_sq))
        p_new = ops.select(apply, p_new, param)
        # slices, not ops.split: its section checks recurse once per section in graph code, past MindSpore's call-depth
        # limit beyond ~100 parameter tensors
        return self.hyper_map(ops.partial(_write_back, p_new), self.params, self.starts, self.ends)

    def moment_arrays(self) -> dict[str, np.ndarray]:
        """Both moments of every parameter, ``adam_m.<name>`` / ``adam_v.<name>``, in the parameter's shape."""
        arrays = {}
        for prefix, flat in (("adam_m", self.exp_avg), ("adam_v", self.exp_avg_sq)):
            pieces = np.split(flat.asnumpy(), self.ends[:-1])
            for p, piece in zip(self.params, pieces):
                arrays[f"{prefix}.{p.name}"] = piece.reshape(p.shape).copy()
        return arrays

    def load_moment_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of ``moment_arrays`` (shapes already checked by the caller)."""
        for prefix, flat in (("adam_m", self.exp_avg), ("adam_v", self.exp_avg_sq)):
            values = [np.asarray(arrays[f"{prefix}.{p.name}"], np.float32).reshape(-1) for p in self.params]
            assign_array(flat, np.concatenate(values))


def _add_to(acc, grad):
    return ops.assign_add(acc, grad.astype(acc.dtype))


def _average(n, acc, grad):
    return (acc + grad.astype(acc.dtype)) / n


def _zero(acc):
    return ops.assign(acc, ops.zeros_like(acc))


def _norm(flat):
    """Euclidean norm of the flat gradient vector: the global norm over every gradient tensor.

    The step also reads "all gradients finite" from this norm being finite: an inf or NaN anywhere makes it
    non-finite. This replaces one IsFinite kernel per gradient tensor (``amp.all_finite``: 17 % of the small LoRA
    step's kernel time on CPU, ``benchmarks/profile_train.py``). It also counts a gradient whose squares overflow
    float32 (an element above ~1.8e19 after unscaling) as an overflow, which skips that update."""
    return ops.sqrt(ops.square(flat).sum())


def _data_parallel_reducer(params: ParameterTuple) -> nn.Cell | None:
    if ms.get_auto_parallel_context("parallel_mode") != ms.ParallelMode.DATA_PARALLEL:
        return None
    from mindspore.communication import get_group_size

    return nn.DistributedGradReducer(
        params, mean=ms.get_auto_parallel_context("gradients_mean"), degree=get_group_size()
    )


class _CompiledStep(nn.Cell):
    """A step function compiled as the ``construct`` of a Cell that owns every parameter the step touches.

    MindSpore's compile cache rebinds a reloaded graph to live parameters by name, from the compiled Cell's
    ``parameters_dict()``; a plain ``ms.jit`` function has no such dict, so a graph reloaded from the cache ran on
    detached copies holding stale values (measured: a different first loss, all-zero gradients, NaN in longer runs).
    ``auto_prefix=False`` keeps every parameter's name as it is (checkpoints are written by name)."""

    def __init__(self, fn: Callable, cells: dict, parameters: Sequence[Parameter]):
        super().__init__(auto_prefix=False)
        self.step_fn = fn
        for name, cell in cells.items():
            setattr(self, name, cell)
        self.extra_params = ParameterTuple(parameters)

    @ms.jit
    def construct(self, *inputs):
        return self.step_fn(*inputs)


@dataclass
class StepOutput:
    """What one call of ``TrainStep`` reports. ``overflow``/``grad_norm`` refer to this micro-step's gradients on
    accumulation micro-steps; ``scale`` is the loss scale this micro-step used; ``updated`` says whether this call
    ended an update boundary (whether it was applied is ``updated and not overflow``); ``parts`` holds the named
    terms of a loss made of several (``loss_net.loss_parts``, e.g. DreamBooth's instance and prior losses)."""

    loss: float
    overflow: bool
    scale: float
    grad_norm: float
    updated: bool
    parts: dict = field(default_factory=dict)


class TrainStep:
    """One training micro-step per call: ``TrainStep(loss_net, params, lr)(*inputs) -> StepOutput``.

    lr: a float (constant) or a per-update table from ``lr_schedules.lr_table``; ``lr_scales`` multiplies it per
    parameter (parameter groups, see ``AdamW``).
    grad_accum_steps: micro-steps per optimizer update; the loss is a per-micro-batch mean, so N micro-batches of
    size b give the same update as one batch of N*b.
    max_grad_norm: clip the (averaged, unscaled) gradients to this global norm; None disables it.
    loss_scaler: ``none`` | ``static`` | ``dynamic`` with ``init_scale``/``scale_factor``/``scale_window``.
    ema: an ``EMA`` over the same ``params`` (or None).
    jit: compile the step as one graph (``_CompiledStep``); False runs it op by op. The trainer passes
    ``mode == 0``: graph mode (the default, and the tiny recipes) compiles it; PyNative (``mode: 1``, what the
    full-size recipes use on a CPU) runs it eagerly.
    """

    def __init__(
        self,
        loss_net: nn.Cell,
        params: Sequence[Parameter],
        lr: float | np.ndarray,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        no_decay: Callable[[str, Parameter], bool] = no_decay_default,
        lr_scales: Sequence[float] | None = None,
        grad_accum_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        loss_scaler: str = "none",
        init_scale: float = 2.0**16,
        scale_factor: int = 2,
        scale_window: int = 1000,
        ema: EMA | None = None,
        jit: bool = True,
    ):
        params = list(params)
        if not params:
            raise ValueError("TrainStep needs at least one trainable parameter")
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise ValueError("trainable parameter names must be unique")
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        if ema is not None and [p.name for p in ema.params] != names:
            raise ValueError("the EMA must be built over the same parameters as the TrainStep")
        self.loss_net = loss_net
        self.part_names = tuple(getattr(loss_net, "loss_parts", ()))
        self.params = ParameterTuple(params)
        self.optimizer = AdamW(
            self.params, betas=betas, eps=eps, weight_decay=weight_decay, no_decay=no_decay, lr_scales=lr_scales
        )
        self.scaler = make_loss_scaler(loss_scaler, init_scale, scale_factor, scale_window)
        self.ema = ema
        self.grad_accum_steps = int(grad_accum_steps)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        table = np.atleast_1d(np.asarray(lr, dtype=np.float32))
        self.lr_table = Tensor(table)
        self.global_step = Parameter(Tensor(0, ms.int32), name="global_step", requires_grad=False)
        self.accum = self.params.clone(prefix="accum", init="zeros") if self.grad_accum_steps > 1 else None
        self.reducer = _data_parallel_reducer(self.params)
        self.micro_step = 0
        self._accumulate, self._update = self._build(jit)

    def _build(self, jit: bool):
        loss_net, scaler, optimizer, ema = self.loss_net, self.scaler, self.optimizer, self.ema
        accum, reducer, n_accum, max_norm = self.accum, self.reducer, self.grad_accum_steps, self.max_grad_norm
        lr_table, global_step, last = self.lr_table, self.global_step, self.lr_table.shape[0] - 1
        hyper_map = ops.HyperMap()

        with_parts = bool(self.part_names)

        def scaled_loss(*inputs):
            out = loss_net(*inputs)
            loss, parts = out if with_parts else (out, out.reshape((1,)))
            return scaler.scale(loss), loss, parts

        grad_fn = ms.value_and_grad(scaled_loss, None, self.params, has_aux=True)

        def accumulate(*inputs):
            scale = scaler.scale_value + 0.0
            (_, loss, parts), grads = grad_fn(*inputs)
            grads = scaler.unscale(grads)
            loss = ops.depend(loss, hyper_map(_add_to, accum, grads))
            norm = _norm(flatten_float32(grads))
            return loss, ops.logical_not(ops.isfinite(norm)), scale, norm, parts

        def update(*inputs):
            scale = scaler.scale_value + 0.0
            (_, loss, parts), grads = grad_fn(*inputs)
            if n_accum > 1:
                grads = hyper_map(ops.partial(_average, float(n_accum)), accum, scaler.unscale(grads))
                loss = ops.depend(loss, hyper_map(_zero, accum))
            if reducer is not None:
                grads = reducer(grads)
            # from here on one float32 vector: unscaling, the norm, clipping and AdamW are a few kernels over it
            # instead of a few per gradient tensor (hundreds of tensors in a LoRA step)
            grad = flatten_float32(grads)
            if n_accum == 1:
                grad = grad * ops.reciprocal(scaler.scale_value)
            norm = _norm(grad)
            finite = ops.isfinite(norm)
            loss = ops.depend(loss, scaler.adjust(finite))
            if max_norm is not None:
                # clip_by_global_norm's formula, reusing the norm instead of computing it a second time
                grad = grad * (max_norm / ops.maximum(norm, max_norm))
            lr = lr_table[ops.minimum(global_step, last)]
            loss = ops.depend(loss, optimizer(grad, lr, finite))
            if ema is not None:
                loss = ops.depend(loss, ema(finite))
            loss = ops.depend(loss, ops.assign_add(global_step, ops.ones((), ms.int32)))
            return loss, ops.logical_not(finite), scale, norm, parts

        if not jit:
            return (accumulate if accum is not None else None), update
        cells = {"loss_net": loss_net, "optimizer": optimizer}
        if ema is not None:
            cells["ema"] = ema
        owned = {id(p) for cell in cells.values() for p in cell.get_parameters()}
        loose = [global_step, *scaler_parameters(scaler), *(accum or ())]
        loose = [p for p in loose if id(p) not in owned]
        compiled_update = _CompiledStep(update, cells, loose)
        if accum is None:
            return None, compiled_update
        return _CompiledStep(accumulate, {"loss_net": loss_net}, [*scaler_parameters(scaler), *accum]), compiled_update

    def __call__(self, *inputs) -> StepOutput:
        last = self.micro_step == self.grad_accum_steps - 1
        fn = self._update if last else self._accumulate
        loss, overflow, scale, norm, parts = fn(*inputs)
        self.micro_step = 0 if last else self.micro_step + 1
        named = dict(zip(self.part_names, parts.asnumpy().tolist()))
        return StepOutput(float(loss), bool(overflow), float(scale), float(norm), last, named)

    @property
    def step(self) -> int:
        """Optimizer update boundaries reached so far (skipped updates included)."""
        return int(self.global_step.asnumpy())

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every tensor needed to resume: params, moments, accumulators, EMA, counters, loss-scale state."""
        arrays = {p.name: p.asnumpy().copy() for p in self._state_parameters()}
        arrays.update(self.optimizer.moment_arrays())
        arrays.update({f"loss_scaler.{k}": v for k, v in scaler_state(self.scaler).items()})
        return arrays

    def load_state_arrays(self, arrays: dict[str, np.ndarray], micro_step: int) -> None:
        """Inverse of ``state_arrays``; every expected key must be present with the same shape and dtype."""
        if not 0 <= micro_step < self.grad_accum_steps:
            raise ValueError(f"micro_step {micro_step} out of range for grad_accum_steps={self.grad_accum_steps}")
        current = self.state_arrays()
        missing = sorted(set(current) - set(arrays))
        if missing:
            raise KeyError(f"train state lacks {len(missing)} tensors, e.g. {missing[:3]}")
        by_name = {p.name: p for p in self._state_parameters()}
        for name, ref in current.items():
            value = np.asarray(arrays[name])
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise ValueError(
                    f"train state tensor {name}: {value.dtype}{list(value.shape)}, "
                    f"expected {ref.dtype}{list(ref.shape)}"
                )
            if name in by_name:
                assign_array(by_name[name], value.copy())
        self.optimizer.load_moment_arrays(arrays)
        load_scaler_state(
            self.scaler, {k[len("loss_scaler.") :]: arrays[k] for k in current if k.startswith("loss_scaler.")}
        )
        self.micro_step = int(micro_step)

    def _state_parameters(self) -> list[Parameter]:
        opt = self.optimizer
        groups = [self.params, [self.global_step, opt.step]]
        if self.accum is not None:
            groups.append(self.accum)
        if self.ema is not None:
            groups += [self.ema.ema_params, [self.ema.updates]]
        return [p for group in groups for p in group]
