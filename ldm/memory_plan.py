"""The memory plan: estimate the peak memory of each way to run a job and pick the fastest one that fits.

A job (a training run or a generation run) can trade speed for memory with switches that do not change its results:
graph mode (0) or op by op (1), recomputing the UNet blocks in the backward pass, the memory-efficient attention
(training), attention slicing and VAE slicing. Before the first step or image, :func:`plan_training` and
:func:`plan_generation` estimate the peak resident memory of every combination from the model config, the batch,
the resolution and the precision, compare it with the memory this process may use (:func:`available_memory`:
``--max_memory_gib``, else the cgroup limit or ``MemAvailable``; on GPU/Ascend the device's memory when MindSpore
reports it), and keep the fastest combination whose estimate fits (the leanest one, with a warning, when none
does). A switch the user set (any value other than ``None``: command line, options file or code) is never changed.

The estimate is a sum of terms a reader can check by hand: the weights (parameters counted from the config), the
trainable parameters' gradients and AdamW moments (and EMA copy), the activations the backward pass keeps (per UNet
block, from its channels and resolution) or, with recompute, each block's input plus one block recomputed, the
attention score tensors, the VAE encode/decode workspace, and a fixed runtime share. The constants below are
counts of kept tensors per block calibrated on SD2-base at 512px (benchmarks/README.md, "Memory plan"); the
measured error of the estimate is stated in docs/memory_and_precision.md.

Order of speed (fastest first), from measurements on a CPU (benchmarks/README.md, "Full size"): graph mode beats op
by op wherever it fits (the small train step is launch-bound); recompute costs about one more forward (1.8x the
full-size step); the memory-efficient attention recomputes the scores in the backward pass (a few percent);
attention slicing adds launches. On a CPU a compiled graph reuses no memory at full size, so graph mode's estimate
there holds every intermediate tensor; on GPU/Ascend graph mode reuses memory like op by op.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from ldm.names import family_of_config, model_node
from ldm.util import ConfigError

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
TEXT_LENGTH = 77

# Relative step time of each slower switch (products order the plans; measured or reasoned as the docstring says).
OP_BY_OP_COST = 2.0
RECOMPUTE_COST = 1.8  # full-size step with recompute: 115 s against 64 s without (benchmarks/README.md)
MEMORY_EFFICIENT_ATTENTION_COST = 1.0  # full-size step: 719 s with it, 839 s without (benchmarks/README.md)
ATTENTION_SLICING_COST = 1.1
VAE_SLICING_COST = 1.02  # one decoder call per image
# A compiled CPU graph that reuses no memory touches fresh pages for every intermediate: the VAE decoder at 256px
# ran 3x slower compiled than op by op (benchmarks/README.md); above this many bytes of intermediates graph mode
# is taken to be that much slower, below it faster (launch-bound small steps).
GRAPH_CPU_LARGE_COST = 3.0 * OP_BY_OP_COST
GRAPH_CPU_LARGE_BYTES = GIB

# Kept tensors per block (in units of the block's channels x pixels), calibrated on SD2-base 512px (see docstring).
RESBLOCK_KEPT_IN = 2  # GroupNorm and SiLU of the input
RESBLOCK_KEPT_OUT = 7  # conv, + time embedding, GroupNorm, SiLU, conv, skip, sum
TRANSFORMER_KEPT = 36  # norms, projections, q/k/v, attention outputs, residuals and the GEGLU's 16 widths
RESAMPLE_KEPT = 2
FORWARD_LIVE_UNITS = 32  # op by op without a backward: live widths of the largest block (sampling)
VAE_LIVE_TENSORS = 6  # op by op VAE encode/decode: live tensors of the largest (channels x pixels) level
RUNTIME_BYTES = int(0.9 * GIB)  # MindSpore runtime, Python, tokenizer, compiled graphs, allocator slack
TRAIN_SETUP_BYTES = int(0.2 * GIB)  # data pipeline, LoRA injection, the train step's buffers
STEP_OVERHEAD_BYTES = int(0.35 * GIB)  # the backward pass's transient gradients beyond the kept activations
# A compiled CPU graph's intermediates, as multiples of what op by op keeps for the backward pass: training keeps
# the forward's and the backward's; a forward-only UNet call
# about half of it (one 512px image: 9.6 GiB in graph mode against 5.5 GiB op by op with slicing).
GRAPH_CPU_TRAIN = 2
GRAPH_CPU_FORWARD = 0.47
MEMORY_EFFICIENT_SCORES = 4096 * 4096  # MemoryEfficientAttention's score budget per slice (float32)


# ---------------------------------------------------------------------------------------------- parameter counts


def _params(config) -> dict:
    return model_node(config)["params"]


def _unet(config) -> dict:
    return _params(config)["unet_config"]["params"]


def _transformer_params(ch: int, context_dim: int, depth: int) -> int:
    """One SpatialTransformer (proj_in/out as 1x1 conv or Linear count alike): inner width = ch."""
    attn1 = 3 * ch * ch + ch * ch + ch
    attn2 = ch * ch + 2 * context_dim * ch + ch * ch + ch
    ff = ch * 8 * ch + 8 * ch + 4 * ch * ch + ch
    block = attn1 + attn2 + ff + 3 * 2 * ch
    return 2 * ch + (ch * ch + ch) + depth * block + (ch * ch + ch)


def _resblock_params(ch_in: int, ch_out: int, emb: int) -> int:
    skip = ch_in * ch_out + ch_out if ch_in != ch_out else 0
    in_layers = 2 * ch_in + 9 * ch_in * ch_out + ch_out
    out_layers = 2 * ch_out + 9 * ch_out * ch_out + ch_out
    return in_layers + emb * ch_out + ch_out + out_layers + skip


@dataclass(frozen=True)
class Block:
    """One UNet block for the activation count: its kind, input/output channels and downsampling factor."""

    kind: str  # "conv", "res", "transformer", "down", "up"
    ch_in: int
    ch_out: int
    factor: int


def unet_blocks(unet: dict) -> list[list[Block]]:
    """The UNet's blocks in order (input blocks, middle block, output blocks), each a list of its layers."""
    mc, mult = unet["model_channels"], list(unet["channel_mult"])
    attn, n_res = set(unet["attention_resolutions"]), unet["num_res_blocks"]
    blocks = [[Block("conv", unet["in_channels"], mc, 1)]]
    skips, ch, ds = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(n_res):
            layers = [Block("res", ch, m * mc, ds)]
            ch = m * mc
            if ds in attn:
                layers.append(Block("transformer", ch, ch, ds))
            blocks.append(layers)
            skips.append(ch)
        if level != len(mult) - 1:
            blocks.append([Block("down", ch, ch, ds)])
            skips.append(ch)
            ds *= 2
    blocks.append([Block("res", ch, ch, ds), Block("transformer", ch, ch, ds), Block("res", ch, ch, ds)])
    for level, m in reversed(list(enumerate(mult))):
        for i in range(n_res + 1):
            layers = [Block("res", ch + skips.pop(), m * mc, ds)]
            ch = m * mc
            if ds in attn:
                layers.append(Block("transformer", ch, ch, ds))
            if level and i == n_res:
                layers.append(Block("up", ch, ch, ds))
                ds //= 2
            blocks.append(layers)
    return blocks


def unet_param_count(config) -> int:
    """Parameters of the UNet a model config builds (``ldm.models.unet.UNetModel``)."""
    unet = _unet(config)
    mc, emb, depth = unet["model_channels"], 4 * unet["model_channels"], unet.get("transformer_depth", 1)
    total = mc * emb + emb + emb * emb + emb  # time_embed
    for layer in itertools.chain.from_iterable(unet_blocks(unet)):
        if layer.kind == "conv":
            total += 9 * layer.ch_in * layer.ch_out + layer.ch_out
        elif layer.kind == "res":
            total += _resblock_params(layer.ch_in, layer.ch_out, emb)
        elif layer.kind == "transformer":
            total += _transformer_params(layer.ch_out, unet["context_dim"], depth)
        else:
            total += 9 * layer.ch_out * layer.ch_out + layer.ch_out
    return total + 2 * mc + 9 * mc * unet["out_channels"] + unet["out_channels"]


def _vae_resnet(ch_in: int, ch_out: int) -> int:
    skip = ch_in * ch_out + ch_out if ch_in != ch_out else 0
    return 2 * ch_in + 9 * ch_in * ch_out + ch_out + 2 * ch_out + 9 * ch_out * ch_out + ch_out + skip


def vae_param_counts(config) -> tuple[int, int]:
    """(encoder + quant_conv, decoder + post_quant_conv) parameters of the VAE (``AutoencoderKL``)."""
    params = _params(config)["first_stage_config"]["params"]
    dd, embed = params["ddconfig"], params["embed_dim"]
    ch, mult, n_res, z = dd["ch"], list(dd["ch_mult"]), dd["num_res_blocks"], dd["z_channels"]
    attn_res, res = set(dd.get("attn_resolutions", [])), dd["resolution"]

    def attn(c: int) -> int:
        return 2 * c + 4 * (c * c + c)

    def mid(c: int) -> int:
        return 2 * _vae_resnet(c, c) + attn(c)

    enc, block_in = 9 * dd["in_channels"] * ch + ch, ch
    for i, m in enumerate(mult):
        for _ in range(n_res):
            enc += _vae_resnet(block_in, ch * m)
            block_in = ch * m
            enc += attn(block_in) if res in attn_res else 0
        if i != len(mult) - 1:
            enc += 9 * block_in * block_in + block_in
            res //= 2
    enc += mid(block_in) + 2 * block_in + 9 * block_in * 2 * z + 2 * z + (2 * z * 2 * embed + 2 * embed)
    block_in = ch * mult[-1]
    dec = 9 * z * block_in + block_in + mid(block_in)
    for i in reversed(range(len(mult))):
        for _ in range(n_res + 1):
            dec += _vae_resnet(block_in, ch * mult[i])
            block_in = ch * mult[i]
            dec += attn(block_in) if res in attn_res else 0
        if i:
            dec += 9 * block_in * block_in + block_in
            res *= 2
    dec += 2 * block_in + 9 * block_in * dd["out_ch"] + dd["out_ch"] + (embed * z + z)
    return enc, dec


def text_encoder_param_count(config) -> int:
    """Parameters of the CLIP/OpenCLIP text encoder: embeddings, ``layers`` pre-norm blocks (MLP width 4x), final
    LayerNorm."""
    text = _params(config)["cond_stage_config"].get("params", {})
    width, layers = text.get("width", 768), text.get("layers", 12)
    vocab, positions = text.get("vocab_size", 49408), text.get("max_length", TEXT_LENGTH)
    block = 4 * width + (4 * width * width + 4 * width) + (8 * width * width + 5 * width)
    return vocab * width + positions * width + layers * block + 2 * width


def lora_param_count(config, rank: int, targets: str = "attention", text_encoder: bool = False) -> int:
    """LoRA parameters (down + up) on the UNet attention projections (``extended``: also proj_in/out and the
    feed-forward) and, with ``text_encoder``, on the text encoder's q/k/v/out projections."""
    unet = _unet(config)
    depth, ctx = unet.get("transformer_depth", 1), unet["context_dim"]
    total = 0
    for layer in itertools.chain.from_iterable(unet_blocks(unet)):
        if layer.kind != "transformer":
            continue
        c = layer.ch_out
        # attn1's to_q/k/v/out and attn2's to_q/out (c -> c), attn2's to_k/v (context -> c)
        per_block = rank * (6 * 2 * c + 2 * (ctx + c))
        if targets == "extended":
            per_block += rank * ((c + 8 * c) + (4 * c + c))  # ff.net.0.proj, ff.net.2
            total += 2 * rank * 2 * c if unet.get("use_linear_in_transformer", False) else 0  # Linear proj_in/out
        total += depth * per_block
    if text_encoder:
        text = _params(config)["cond_stage_config"].get("params", {})
        width, layers = text.get("width", 768), text.get("layers", 12)
        # SD1: q/k/v/out (4 x (w + w)); SD2: OpenCLIP's fused in_proj (w + 3w) and out_proj (w + w)
        per_layer = 6 * width if family_of_config(config) == "sd2" else 8 * width
        total += layers * rank * per_layer
    return total


# ---------------------------------------------------------------------------------------------- activations


def _heads(unet: dict, ch: int) -> int:
    return ch // unet["num_head_channels"] if unet.get("num_head_channels", -1) not in (-1, None) else unet["num_heads"]


def _block_units(layers: list[Block], pixels: int) -> int:
    """Kept elements of one block for one sample (without attention scores)."""
    units = 0
    for layer in layers:
        n = pixels // layer.factor**2
        if layer.kind == "res":
            units += RESBLOCK_KEPT_IN * layer.ch_in * n + RESBLOCK_KEPT_OUT * layer.ch_out * n
        elif layer.kind == "transformer":
            units += TRANSFORMER_KEPT * layer.ch_out * n
        elif layer.kind == "up":
            units += RESAMPLE_KEPT * 4 * layer.ch_out * n
        else:
            units += RESAMPLE_KEPT * layer.ch_out * n
    return units


def _score_elements(unet: dict, layers: list[Block], pixels: int) -> int:
    """Attention score elements of one block for one sample: (self + cross) x heads x tokens x keys."""
    total = 0
    for layer in layers:
        if layer.kind == "transformer":
            n = pixels // layer.factor**2
            total += unet.get("transformer_depth", 1) * _heads(unet, layer.ch_out) * n * (n + TEXT_LENGTH)
    return total


def _largest_self_scores(unet: dict, blocks: list[list[Block]], pixels: int) -> int:
    """Score elements of the largest single self-attention (one sample, all heads)."""
    sizes = [
        _heads(unet, layer.ch_out) * (pixels // layer.factor**2) ** 2
        for layer in itertools.chain.from_iterable(blocks)
        if layer.kind == "transformer"
    ]
    return max(sizes, default=0)


def _vae_workspace(config, batch: int, height: int, width: int, dtype_bytes: int, decode: bool) -> int:
    """Live tensors of an op-by-op VAE encode or decode: the widest (channels x pixels) level; the decoder's widest
    is the upsampled input of a level, which still has the level below's channels."""
    dd = _params(config)["first_stage_config"]["params"]["ddconfig"]
    ch, mult = dd["ch"], list(dd["ch_mult"])
    shift = 1 if decode else 0
    widest = max(ch * mult[min(i + shift, len(mult) - 1)] * (height * width) // 4**i for i in range(len(mult)))
    return VAE_LIVE_TENSORS * batch * widest * dtype_bytes


# ---------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """One way to run a job; ``vae_slicing`` is generation's only."""

    mode: int = 0
    use_recompute: bool = False
    memory_efficient_attention: bool = False
    attention_slice_size: int = 0
    vae_slicing: bool = False

    @property
    def cost(self) -> float:
        """Relative time (1.0: graph mode, nothing recomputed or sliced)."""
        cost = OP_BY_OP_COST if self.mode == 1 else 1.0
        cost *= RECOMPUTE_COST if self.use_recompute else 1.0
        cost *= MEMORY_EFFICIENT_ATTENTION_COST if self.memory_efficient_attention else 1.0
        cost *= VAE_SLICING_COST if self.vae_slicing else 1.0
        return cost * (ATTENTION_SLICING_COST if self.attention_slice_size else 1.0)

    def describe(self, training: bool) -> str:
        parts = ["graph" if self.mode == 0 else "op by op"]
        if training:
            parts.append(f"recompute {'on' if self.use_recompute else 'off'}")
            parts.append(f"mem-efficient attention {'on' if self.memory_efficient_attention else 'off'}")
        parts.append(f"attention slice {self.attention_slice_size}")
        if not training:
            parts.append(f"VAE slicing {'on' if self.vae_slicing else 'off'}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Estimate:
    """A plan, its estimated peak (bytes) with the terms it is made of, and its relative time."""

    plan: Plan
    peak: int
    terms: dict
    cost: float


@dataclass(frozen=True)
class Decision:
    """The chosen estimate, the memory it was compared with and where that figure came from."""

    chosen: Estimate
    available: int
    source: str
    fits: bool
    training: bool

    def log_line(self) -> str:
        verdict = "" if self.fits else " (no plan fits: the leanest is used)"
        return (
            f"memory plan: {self.chosen.plan.describe(self.training)} - est. peak {self.chosen.peak / GIB:.1f} GiB of "
            f"{self.available / GIB:.1f} GiB available ({self.source}){verdict}"
        )


@dataclass(frozen=True)
class TrainJob:
    """What the training estimate depends on."""

    batch: int
    height: int
    width: int
    precision: str = "fp32"  # the UNet's compute dtype
    vae_precision: str = "fp32"
    text_precision: str = "fp32"
    use_lora: bool = True
    lora_rank: int = 4
    lora_targets: str = "attention"
    lora_ft_text_encoder: bool = False
    cache_latents: bool = False
    cache_text_embeddings: bool = False
    use_ema: bool = False
    grad_accum: int = 1
    device_target: str = "CPU"


@dataclass(frozen=True)
class GenerateJob:
    """What the generation estimate depends on (``batch``: images per call; guidance doubles the UNet's batch)."""

    batch: int
    height: int
    width: int
    guided: bool = True
    precision: str = "fp32"
    vae_precision: str = "fp32"
    device_target: str = "CPU"


def _latent_pixels(config, height: int, width: int) -> int:
    dd = _params(config)["first_stage_config"]["params"]["ddconfig"]
    f = 2 ** (len(dd["ch_mult"]) - 1)
    return (height // f) * (width // f)


def _graph_keeps_everything(device_target: str) -> bool:
    """A compiled graph on the CPU reuses no memory at this size (benchmarks/README.md); elsewhere it does."""
    return device_target == "CPU"


def _cost(plan: Plan, device_target: str, intermediates: int) -> float:
    """The plan's relative time; graph mode on a CPU holding more than GRAPH_CPU_LARGE_BYTES of intermediates is
    the slow case."""
    if plan.mode == 0 and _graph_keeps_everything(device_target) and intermediates > GRAPH_CPU_LARGE_BYTES:
        return plan.cost * GRAPH_CPU_LARGE_COST
    return plan.cost


def estimate_training(config, job: TrainJob, plan: Plan) -> Estimate:
    """The estimated peak resident memory of a training run with ``plan`` (bytes), as a sum of named terms."""
    unet = _unet(config)
    blocks = unet_blocks(unet)
    pixels, b = _latent_pixels(config, job.height, job.width), DTYPE_BYTES[job.precision]
    enc, dec = vae_param_counts(config)
    unet_n, text_n = unet_param_count(config), text_encoder_param_count(config)
    trainable = (
        lora_param_count(config, job.lora_rank, job.lora_targets, job.lora_ft_text_encoder) if job.use_lora else unet_n
    )
    frozen_unet = unet_n * (b if job.use_lora else 4)
    vae_b, text_b = DTYPE_BYTES[job.vae_precision], DTYPE_BYTES[job.text_precision]
    encoders = (0 if job.cache_latents else enc * vae_b) + (0 if job.cache_text_embeddings else text_n * text_b)
    weights = frozen_unet + dec * vae_b + encoders
    # per trainable parameter: fp32 gradient, AdamW's two moments, an EMA copy, an accumulation buffer
    copies = 3 + (1 if job.use_ema else 0) + (1 if job.grad_accum > 1 else 0)
    optimizer = trainable * 4 * copies + (trainable * 4 if job.use_lora else 0)
    per_block = [_block_units(layers, pixels) * b for layers in blocks]
    scores = [_score_elements(unet, layers, pixels) * 4 * 2 for layers in blocks]  # scores + softmax, float32
    if plan.memory_efficient_attention:
        kept_scores = [0] * len(scores)
        attention_workspace = min(MEMORY_EFFICIENT_SCORES, _largest_self_scores(unet, blocks, pixels)) * 4 * 4
    else:
        kept_scores = scores
        attention_workspace = 0
    inputs = sum(layers[0].ch_in * pixels // layers[0].factor ** 2 for layers in blocks) * b
    if plan.use_recompute:
        activations = inputs + max(a + s for a, s in zip(per_block, kept_scores, strict=True))
    else:
        activations = sum(per_block) + sum(kept_scores)
    activations *= job.batch
    if plan.mode == 0 and _graph_keeps_everything(job.device_target):
        activations = GRAPH_CPU_TRAIN * (sum(per_block) + sum(scores)) * job.batch
    step = activations + attention_workspace * job.batch + STEP_OVERHEAD_BYTES
    runtime = RUNTIME_BYTES + TRAIN_SETUP_BYTES
    encode = 0 if job.cache_latents else _vae_workspace(config, job.batch, job.height, job.width, vae_b, decode=False)
    caching = (unet_n + enc + dec + text_n) * 4 if (job.cache_latents or job.cache_text_embeddings) else 0
    if job.cache_latents:  # the cache encodes one image at a time
        caching += _vae_workspace(config, 1, job.height, job.width, vae_b, decode=False)
    terms = {
        "weights": weights,
        "optimizer": optimizer,
        "activations": step,
        "vae_encode": encode,
        "runtime": runtime,
        "caching": caching + runtime,
    }
    peak = max(weights + optimizer + max(step, encode) + runtime, caching + runtime)
    return Estimate(plan, peak, terms, _cost(plan, job.device_target, activations))


def estimate_generation(config, job: GenerateJob, plan: Plan) -> Estimate:
    """The estimated peak resident memory of a generation run with ``plan`` (bytes)."""
    unet = _unet(config)
    blocks = unet_blocks(unet)
    pixels, b = _latent_pixels(config, job.height, job.width), DTYPE_BYTES[job.precision]
    enc, dec = vae_param_counts(config)
    unet_n, text_n = unet_param_count(config), text_encoder_param_count(config)
    rows = job.batch * (2 if job.guided else 1)
    weights = unet_n * b + (enc + dec) * DTYPE_BYTES[job.vae_precision]
    build = (unet_n + enc + dec + text_n) * 4  # the fp32 build (the text encoder is released after encoding)
    layers = list(itertools.chain.from_iterable(blocks))
    largest = max(layer.ch_out * pixels // layer.factor**2 for layer in layers if layer.kind == "res")
    # the largest self-attention's scores and softmax (float32) for the (batch x head) rows one slice holds
    heads = max((_heads(unet, layer.ch_out) for layer in layers if layer.kind == "transformer"), default=1)
    slice_rows = min(plan.attention_slice_size or rows * heads, rows * heads)
    scores = 2 * (_largest_self_scores(unet, blocks, pixels) // heads) * slice_rows * 4
    if plan.mode == 0 and _graph_keeps_everything(job.device_target):
        kept = sum(_block_units(block, pixels) * b + _score_elements(unet, block, pixels) * 4 * 2 for block in blocks)
        sampling = int(GRAPH_CPU_FORWARD * rows * kept)
    else:
        sampling = FORWARD_LIVE_UNITS * rows * largest * b + scores
    decode_batch = 1 if plan.vae_slicing else job.batch
    decode = _vae_workspace(config, decode_batch, job.height, job.width, DTYPE_BYTES[job.vae_precision], True)
    terms = {"weights": weights, "sampling": sampling, "vae_decode": decode, "runtime": RUNTIME_BYTES, "build": build}
    peak = max(weights + max(sampling, decode), build) + RUNTIME_BYTES
    return Estimate(plan, peak, terms, _cost(plan, job.device_target, sampling))


# ---------------------------------------------------------------------------------------------- available memory


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), None
    without a limit."""
    files = (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))
    for limit_file, usage_file in files:
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            return max(limit - usage, 0)
    return None


def _proc_kib_field(path: Path, field: str) -> int | None:
    """Bytes of a ``field: N kB`` line of a /proc file (``/proc/meminfo``, ``/proc/self/status``), None if absent."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    return _proc_kib_field(path, "MemAvailable")


def _own_rss() -> int:
    return _proc_kib_field(Path("/proc/self/status"), "VmRSS") or 0


def _device_memory(device_target: str) -> int | None:
    """The accelerator's total memory as MindSpore reports it (None when it does not)."""
    try:
        import mindspore as ms

        return int(ms.hal.get_device_properties(0, device_target).total_memory)
    except Exception:  # noqa: BLE001 - any failure means "not reported"; the caller says what it assumes
        return None


def check_max_memory_gib(value, source: str = "--max_memory_gib") -> None:
    """``value`` is None or a positive, finite number of GiB (a ConfigError naming ``source`` otherwise)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source} must be a positive number of GiB (e.g. 16), got {value!r}")


def available_memory(device_target: str = "CPU", max_memory_gib: float | None = None) -> tuple[int, str]:
    """(bytes this process may use, where the figure comes from): ``max_memory_gib`` when given; on GPU/Ascend the
    device's memory if MindSpore reports it; else the room under the cgroup limit or ``MemAvailable``, plus what
    this process already holds (the estimates are of the whole process)."""
    check_max_memory_gib(max_memory_gib)
    if max_memory_gib is not None:
        return int(max_memory_gib * GIB), "--max_memory_gib"
    note = ""
    if device_target != "CPU":
        device = _device_memory(device_target)
        if device is not None:
            return device, f"{device_target} device memory"
        note = f"; {device_target} memory not reported, assuming the host's"
    room, source = _cgroup_room(), "cgroup limit"
    free = _meminfo_available()
    if room is None or (free is not None and free < room):
        room, source = free, "MemAvailable"
    if room is None:
        return 16 * GIB, "assumed 16 GiB: no cgroup limit or /proc/meminfo" + note
    return room + _own_rss(), source + note


# ---------------------------------------------------------------------------------------------- choosing


def choose(estimates: list[Estimate], available: int, source: str, training: bool) -> Decision:
    """The fastest estimate that fits ``available`` (ties: the leaner), else the leanest."""
    fitting = [e for e in estimates if e.peak <= available]
    if fitting:
        best = min(fitting, key=lambda e: (e.cost, e.peak))
        return Decision(best, available, source, True, training)
    return Decision(min(estimates, key=lambda e: (e.peak, e.cost)), available, source, False, training)


# The switches each job's plan chooses (option name -> values tried); the options of those names left unset (None)
# are the ones the plan fills in.
TRAINING_SWITCHES = {
    "mode": (0, 1),
    "use_recompute": (False, True),
    "memory_efficient_attention": (False, True),
    "attention_slice_size": (0,),
}
GENERATION_SWITCHES = {"mode": (0, 1), "attention_slice_size": (0, 1), "vae_slicing": (False, True)}


def given_switches(opts, switches: dict) -> dict:
    """The user's values of ``switches`` in ``opts`` (None where the plan chooses)."""
    return {name: getattr(opts, name) for name in switches}


def _candidates(fixed: dict, switches: dict) -> list[Plan]:
    """Every plan over ``switches`` (name -> values) with the ``fixed`` ones held at the user's value."""
    names = list(switches)
    values = [[fixed[n]] if fixed.get(n) is not None else switches[n] for n in names]
    return [Plan(**dict(zip(names, combo, strict=True))) for combo in itertools.product(*values)]


def plan_training(config, job: TrainJob, given: dict, available: int, source: str) -> Decision:
    """Choose mode, recompute and the attention options of a training run; ``given`` holds the user's values (None:
    the plan chooses)."""
    estimates = [estimate_training(config, job, plan) for plan in _candidates(given, TRAINING_SWITCHES)]
    return choose(estimates, available, source, training=True)


def plan_generation(config, job: GenerateJob, given: dict, available: int, source: str) -> Decision:
    """Choose mode, attention slicing and VAE slicing of a generation run."""
    estimates = [estimate_generation(config, job, plan) for plan in _candidates(given, GENERATION_SWITCHES)]
    return choose(estimates, available, source, training=False)


def apply_plan(opts, decision: Decision):
    """``opts`` with every switch of the chosen plan that the options leave unset (None) filled in."""
    plan = dataclasses.asdict(decision.chosen.plan)
    return dataclasses.replace(opts, **{k: v for k, v in plan.items() if hasattr(opts, k) and getattr(opts, k) is None})
