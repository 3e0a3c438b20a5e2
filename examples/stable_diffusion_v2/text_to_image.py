"""Generate images from text prompts with Stable Diffusion 1.5/2.x, optionally with LoRA adapters merged in.

    python examples/stable_diffusion_v2/text_to_image.py --prompt "a red fox" --ckpt_path sd21.safetensors \
        [--use_lora True --lora_ckpt_path a.safetensors --lora_scale 0.8] [--sampler dpm_solver_pp]
    python examples/stable_diffusion_v2/text_to_image.py --config_file my_run.yaml [--seed 7]
    python examples/stable_diffusion_v2/text_to_image.py --prompt "a (red:1.3) fox" --prompt_weighting True \
        --init_image fox.png --strength 0.6 --clip_skip 1 --ckpt_path sd15.safetensors

Prompts longer than 77 tokens are encoded in 75-token chunks; ``--init_image``/``--strength`` is img2img
(docs/prompts_and_img2img.md).

Every option is also a key of the ``--config_file`` YAML (the command line wins; ``ldm.generate_options``).

Writes ``<output_path>/samples/NNNNN.png`` (+ ``NNNNN.json`` with the settings and per-image seed) and one
``<output_path>/grid-<k>.png`` per prompt. Without ``--H``/``--W``/``--scale`` the model config decides (its image
size times the VAE factor; guidance 7.5 for SD1, 9.0 for SD2). Errors are one ``error: ...`` line on stderr with exit
status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import sys

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.cli import call, debug_requested
from ldm.generate import NOT_IN_GRAPH_KEY, generate, graph_inputs, plan_memory, validate_job
from ldm.generate_options import build_parser, parse_options
from ldm.util import check_output_folder


def _generate(argv) -> int:
    opts = parse_options(argv, build_parser(__doc__.split("\n\n")[0]))
    validate_job(opts)  # fail fast, before MindSpore is imported
    check_output_folder(opts.output_path, "--output_path")
    from ldm.compile_cache import use_compile_cache
    from ldm.env import init_env

    opts = plan_memory(opts)  # before MindSpore starts: the plan chooses the mode
    init_env(opts.device_target, mode=opts.mode, seed=opts.seed)
    inputs = graph_inputs(opts)
    use_compile_cache(opts.compile_cache, opts.mode, "generate", opts, inputs, ignore=NOT_IN_GRAPH_KEY, log=print)
    generate(opts)
    return 0


def main(argv=None) -> int:
    return call(lambda: _generate(argv), debug=debug_requested(argv))


if __name__ == "__main__":
    sys.exit(main())
