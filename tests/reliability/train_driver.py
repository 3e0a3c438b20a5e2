"""Run the training CLI unchanged (``runpy``) with fault hooks chosen by environment variables.

    python train_driver.py examples/stable_diffusion_v2/train_text_to_image.py [options...]

* ``LDM_TEST_THREADS``: CPU threads for MindSpore (speed only).
* ``LDM_REL_KILL_WRITING``: a file name (e.g. ``lora-000004.safetensors``); when the checkpoint writer has written
  half of that file's temp copy, the process SIGKILLs itself (a kill in the middle of a checkpoint write).
* ``LDM_REL_NAN_STEPS``: comma-separated micro-steps (1-based) whose images are replaced by NaN, so their loss and
  gradients are NaN (a forced non-finite loss).
"""

import os
import runpy
import signal
import sys

import ldm  # noqa: F401  (before mindspore)
import ldm.env

env = os.environ
init_env = ldm.env.init_env


def init_env_for_tests(*args, **kwargs):
    return init_env(*args, **kwargs, threads=int(env.get("LDM_TEST_THREADS", "2")))


ldm.env.init_env = init_env_for_tests

if env.get("LDM_REL_KILL_WRITING"):
    import safetensors.numpy

    save_file = safetensors.numpy.save_file
    target = f".{env['LDM_REL_KILL_WRITING']}."

    def save_half_then_die(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        if target in os.path.basename(filename):
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.numpy.save_file = save_half_then_die

if env.get("LDM_REL_NAN_STEPS"):
    import numpy as np

    import ldm.data

    nan_steps = {int(s) for s in env["LDM_REL_NAN_STEPS"].split(",")}
    build_pipeline = ldm.data.build_pipeline

    class NaNBatches:
        """The run's dataset with the images of the chosen micro-steps replaced by NaN."""

        def __init__(self, dataset, first_step: int):
            self.dataset, self.first_step = dataset, first_step

        def __getattr__(self, name):
            return getattr(self.dataset, name)  # size, bucket table and order: the wrapped dataset's

        def create_tuple_iterator(self, *args, **kwargs):
            batches = self.dataset.create_tuple_iterator(*args, **kwargs)
            for step, (images, tokens) in enumerate(batches, self.first_step):
                yield (np.full_like(images, np.nan) if step in nan_steps else images), tokens

    def build_with_nan(data, order, *args, **kwargs):
        return NaNBatches(build_pipeline(data, order, *args, **kwargs), order.batches_done + 1)

    ldm.data.build_pipeline = build_with_nan

script, *argv = sys.argv[1:]
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
