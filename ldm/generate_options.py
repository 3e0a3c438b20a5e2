"""Options of a generation run: the schema (``GenerateOptions``, with help and choices in each field's metadata) and
its parser (defaults < ``--config_file`` YAML < command line, through :mod:`ldm.options`), MindSpore-free.

Every field is a ``--flag`` of ``text_to_image.py`` and a key of its ``--config_file``, so an inference run is
repeatable from one file the way a training run is from ``--train_config``. A ``config`` (model YAML) given in the
file is found next to the file, then in the repository's ``configs/``. The prompts come from ``prompt`` or
``data_path`` (one of the two; one given on the command line replaces the file's other).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ldm.cli import Parser, str2bool
from ldm.io.model_config import find_config_file
from ldm.names import DPM_ALGORITHM_TYPES, KARRAS_SAMPLERS, SAMPLER_NAMES
from ldm.options import (
    RunOptions,
    add_options,
    check_run_options,
    option,
    optional_float,
    optional_int,
    parse_over_file,
    read_options_file,
)
from ldm.precision import PRECISIONS, unet_precision
from ldm.util import VERSIONS, read_text_utf8


class GenerationError(ValueError):
    """Bad generation input (prompts, sizes, adapter options); the message names the culprit."""


@dataclass
class GenerateOptions(RunOptions):
    """Every option of a generation run; the CLI fills it from defaults < ``--config_file`` < command line."""

    prompt: str = option("", "one prompt (or --data_path)")
    data_path: str = option("", "text file with one prompt per line (or --prompt)")
    negative_prompt: str = option("", "negative prompt for every image")
    config: str = option("", "model YAML config (overrides --version)")
    version: str | None = option(None, "bundled config of this SD version (default 2.1)", choices=tuple(VERSIONS))
    ckpt_path: str = option("", "weights: our/Stability single file or a diffusers folder (empty: random)")
    allow_pickle: bool = option(
        False,
        "read PyTorch pickle checkpoints (.ckpt/.pt/.bin) with a restricted unpickler that only rebuilds tensors; "
        "only for files you trust",
    )
    sampler: str = option(
        "dpm_solver_pp",
        "sampler (docs/samplers.md): ddim, plms, dpm_solver_pp (DPM++ 2M), unipc, euler, euler_a (Euler ancestral), "
        "heun",
        choices=SAMPLER_NAMES,
    )
    sampling_steps: int = option(20, "sampler steps (heun calls the model twice per step)")
    use_karras_sigmas: bool = option(
        False, f"Karras noise levels (diffusers' use_karras_sigmas; {', '.join(KARRAS_SAMPLERS)} only)"
    )
    algorithm_type: str = option(
        DPM_ALGORITHM_TYPES[0],
        "dpm_solver_pp only: dpmsolver++ (DPM++ 2M) or sde-dpmsolver++ (DPM++ 2M SDE, stochastic: its noise is seeded "
        "by --seed)",
        choices=DPM_ALGORITHM_TYPES,
    )
    scale: float | None = option(None, "guidance scale (not set: 9.0 for SD2, 7.5 for SD1)", parse=optional_float)
    ddim_eta: float = option(0.0, "DDIM eta (0: deterministic)")
    clip_skip: int = option(
        0,
        "condition on the text encoder's layer this many before the last (diffusers' clip_skip; 1 is the WebUI's "
        "'CLIP skip 2'; SD2 already uses OpenCLIP's penultimate layer at 0; docs/prompts_and_img2img.md)",
    )
    prompt_weighting: bool = option(
        False,
        "read the WebUI's weights in prompts: (word:1.3), (word) = x1.1, [word] = /1.1, \\( for a literal "
        "bracket; False: brackets are text, as in training captions",
    )
    init_image: str = option(
        "",
        "img2img: start from this image (PNG/JPEG of the output size; --H/--W default to its size) noised to "
        "--strength; empty: text-to-image",
    )
    strength: float | None = option(
        None,
        "img2img: how far the image is noised, in (0, 1]; the run takes int(sampling_steps * strength) steps "
        "(diffusers' strength; not set: 0.8)",
        parse=optional_float,
    )
    n_samples: int = option(1, "batch size per prompt")
    n_iter: int = option(2, "batches per prompt; iteration i uses seed + i")
    H: int | None = option(None, "image height (not set: the model config's native size)", parse=optional_int)
    W: int | None = option(None, "image width (not set: the model config's native size)", parse=optional_int)
    seed: int = option(42, "seed of the initial latents (and of a stochastic sampler's noise)")
    seed_per_prompt: bool = option(
        False,
        "True: prompt k's iteration i uses seed + k * n_iter + i, so no two prompts share noise (sample sets for "
        "FID); False: every prompt uses the same seeds (compare prompts)",
    )
    use_lora: bool = option(False, "merge the --lora_ckpt_path adapters")
    lora_ckpt_path: list = option([], "LoRA adapter file(s) (repeatable)", items=str)
    lora_scale: list = option([], "scale per adapter (repeatable; not set: 1.0 each)", items=float)
    lora_ft_text_encoder: bool = option(False, "also merge the adapters' text-encoder modules")
    output_path: str = option("output/", "folder of samples/ and grids")
    attention_slice_size: int | None = option(
        None,
        "attention over this many batch x head rows at a time (0: all; not set: the memory plan chooses)",
        parse=optional_int,
    )
    vae_slicing: bool | None = option(
        None, "decode one image of a batch at a time (not set: the memory plan chooses)", parse=str2bool
    )
    vae_tile_latent_size: int = option(0, "decode in overlapping tiles of this many latents (0: off)")
    precision: str | None = option(
        None,
        "compute dtype of the UNet and by default the text encoder (not set: fp32; norms and softmax stay fp32)",
        choices=PRECISIONS,
    )
    prompts: list = option([], "the prompts, from prompt or data_path", cli=False)

    def adapters(self) -> list[str]:
        """The adapter files to merge: ``lora_ckpt_path`` when ``use_lora`` is on, else none."""
        return list(self.lora_ckpt_path) if self.use_lora else []

    def sampler_options(self) -> dict:
        """The options of ``sampler`` that differ from its defaults; an option the sampler lacks is an error."""
        options = {}
        if self.use_karras_sigmas:
            if self.sampler not in KARRAS_SAMPLERS:
                raise GenerationError(
                    f"--use_karras_sigmas does not apply to --sampler {self.sampler} (Karras sigmas are an option of "
                    f"{', '.join(KARRAS_SAMPLERS)})"
                )
            options["use_karras_sigmas"] = True
        if self.algorithm_type != DPM_ALGORITHM_TYPES[0]:
            if self.sampler != "dpm_solver_pp":
                raise GenerationError(
                    f"--algorithm_type {self.algorithm_type} applies to --sampler dpm_solver_pp only "
                    f"(not {self.sampler})"
                )
            options["algorithm_type"] = self.algorithm_type
        return options

    def unet_precision(self) -> str:
        """``precision``, or fp16 from mindone's ``use_fp16``, by the rule training uses too (both at odds: an error
        naming both)."""
        return unet_precision(self.precision, self.use_fp16)


def read_prompts(path: str | Path) -> list[str]:
    """Non-blank lines of a prompt file; a missing or empty file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"{path}: prompt file not found")
    prompts = [line.strip() for line in read_text_utf8(path).splitlines() if line.strip()]
    if not prompts:
        raise GenerationError(f"{path}: prompt file holds no prompts")
    return prompts


def build_parser(description: str = "Generate images from text prompts with Stable Diffusion.") -> Parser:
    parser = Parser(description=description, allow_abbrev=False)
    parser.add_argument("--config_file", default="", help="YAML with any of the options below (the command line wins)")
    add_options(parser, GenerateOptions)
    return parser


def parse_options(argv=None, parser: Parser | None = None) -> GenerateOptions:
    """Options from defaults < ``--config_file`` < command line, with the prompts read and the precision options
    checked (all before MindSpore is imported)."""
    parser = parser or build_parser()
    args, _ = parser.parse_known_args(argv)
    path = args.config_file
    file_values = read_options_file(GenerateOptions, path) if path else {}
    if file_values.get("config"):
        file_values["config"] = str(find_config_file(file_values["config"], Path(path).parent))
    values, explicit = parse_over_file(parser, argv, file_values, drop=("config_file",))
    for one, other in (("prompt", "data_path"), ("data_path", "prompt")):
        if one in explicit and other not in explicit:
            values[other] = ""
    if bool(values["prompt"]) == bool(values["data_path"]):
        where = f" (command line and {path})" if path else ""
        raise GenerationError(f"give exactly one of --prompt and --data_path{where}")
    opts = GenerateOptions(**values)
    check_run_options(opts, path or "command line")
    opts.prompts = read_prompts(opts.data_path) if opts.data_path else [opts.prompt]
    if not opts.prompts[0].strip():
        raise GenerationError("--prompt is empty")
    if opts.lora_ckpt_path and not opts.use_lora:
        print("note: --lora_ckpt_path given without --use_lora True: adapters are not applied", file=sys.stderr)
    if opts.use_lora and not opts.lora_ckpt_path:
        raise GenerationError("--use_lora True needs at least one --lora_ckpt_path")
    opts.unet_precision()
    return opts
