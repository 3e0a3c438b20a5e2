"""Held-out validation loss: the training objective on images the run never trains on, at fixed timesteps with
fixed noise, so that the number moves only when the weights do.

The set is ``validation_data_path`` or the ``validation_split`` of the training data
(:func:`ldm.data.dataset.split_records` leaves those images out of training). Each image is resized and centre-cropped
to ``image_size`` (a square, also with buckets), not flipped, encoded once to the VAE posterior's mean (scaled) and
paired with its first caption as written (no caption rules), whose text context is encoded once too (or, when the
text encoder trains, kept as token ids and encoded at every evaluation). Every (image, timestep) pair gets its own
noise and offset noise from a generator of its own, drawn once when the set is built: the training stream
(``NoiseSampler``, data order, augmentation) is never touched, so a run with the validation loss equals a run
without it. The loss is the training loss (the same Min-SNR weights and offset noise) evaluated without gradients,
the trainable networks in eval mode (LoRA dropout off), averaged over every pair.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor

VALIDATION_STREAM = (0, 0x7A11)  # appended to the seed: the fixed validation noise's generator
DEFAULT_TIMESTEP_COUNT = 5


def spread_timesteps(num_timesteps: int, count: int = DEFAULT_TIMESTEP_COUNT) -> list[int]:
    """``count`` timesteps at the centres of equal parts of the schedule (100, 300, ..., 900 for 5 of 1000)."""
    return [int((2 * k + 1) * num_timesteps // (2 * count)) for k in range(count)]


def check_timesteps(timesteps: list[int], num_timesteps: int) -> list[int]:
    """The timesteps as given, each checked to lie in the schedule; empty gives :func:`spread_timesteps`."""
    if not timesteps:
        return spread_timesteps(num_timesteps)
    bad = [t for t in timesteps if not 0 <= t < num_timesteps]
    if bad:
        raise ValueError(f"validation_loss_timesteps {bad} are outside the schedule [0, {num_timesteps})")
    return [int(t) for t in timesteps]


@dataclass
class ValidationSet:
    """Fixed inputs of the validation loss: ``latents`` [N, C, h, w], ``text`` [N, ...] (contexts or token ids),
    and per (image, timestep) row the image index, the timestep, the noise and the offset noise."""

    latents: np.ndarray
    text: np.ndarray
    rows: np.ndarray
    timesteps: np.ndarray
    noise: np.ndarray
    offset: np.ndarray

    @classmethod
    def build(cls, latents: np.ndarray, text: np.ndarray, timesteps: list[int], seed: int) -> ValidationSet:
        """Pair every image with every timestep and draw each pair's noise once from the set's own generator."""
        n, c = latents.shape[:2]
        rows = np.repeat(np.arange(n), len(timesteps))
        steps = np.tile(np.asarray(timesteps, np.int32), n)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *VALIDATION_STREAM])))
        noise = rng.standard_normal((len(rows), *latents.shape[1:]), dtype=np.float32)
        offset = rng.standard_normal((len(rows), c, 1, 1), dtype=np.float32)
        return cls(latents.astype(np.float32), text, rows, steps, noise, offset)

    def __len__(self) -> int:
        return len(self.rows)

    def loss(self, loss_net, batch_size: int) -> float:
        """Mean loss over every (image, timestep) pair, in batches of ``batch_size`` (no gradient is taken)."""
        total = 0.0
        for start in range(0, len(self.rows), batch_size):
            part = slice(start, start + batch_size)
            images = self.rows[part]
            value = loss_net(
                Tensor(self.latents[images]),
                Tensor(self.text[images]),
                Tensor(self.timesteps[part]),
                Tensor(self.noise[part]),
                Tensor(self.offset[part]),
            )
            total += float(value.asnumpy()) * len(images)
        return total / len(self.rows)


def validation_records(opts) -> tuple[str, list]:
    """``(what was read, records)`` of the validation set: every usable image of ``validation_data_path``, or those
    ``validation_split`` holds out of the training data (``data_path`` or the dataset config)."""
    from ldm.data.captions import CaptionRules
    from ldm.data.dataset import scan_dataset, split_records
    from ldm.data.kohya import read_records
    from ldm.train.options import folder_options, validation_folder_options

    if opts.validation_data_path:
        label, records, _ = read_records(opts.validation_data_path, validation_folder_options(opts), CaptionRules())
        return label, scan_dataset(opts.validation_data_path, label, records)[0]
    label, records, _ = read_records(opts.data_path, folder_options(opts), CaptionRules())
    return label, split_records(scan_dataset(opts.data_path, label, records)[0], opts.validation_split, opts.seed)[1]


def encode_validation_set(model, records, image_size: int, encode_text: bool, timesteps, seed: int) -> ValidationSet:
    """Encode the records once, op by op (before the frozen encoders may be released): the posterior mean scaled,
    and the first caption's context (its token ids when ``encode_text``: the text encoder trains)."""
    from ldm.data.transforms import ImageTransform, load_rgb

    transform = ImageTransform(image_size, random_crop=False, flip=False)
    latents, texts = [], []
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        for record in records:
            image = transform.centred(load_rgb(record.path), mirrored=False)[None]
            mean, logvar = model.encode_first_stage(Tensor(image))
            latents.append(model.get_first_stage_encoding(mean, logvar).asnumpy()[0])
            ids = model.tokenize([record.captions[0]])
            texts.append(ids[0] if encode_text else model.get_learned_conditioning(Tensor(ids)).asnumpy()[0])
    finally:
        ms.set_context(mode=mode)
    return ValidationSet.build(np.stack(latents), np.stack(texts), timesteps, seed)


def trainable_networks(model, train_text_encoder: bool) -> list:
    """The networks a step trains (the UNet, and the text encoder when it trains): those in train mode."""
    return [model.model, model.cond_stage_model] if train_text_encoder else [model.model]


def set_training(model, train_text_encoder: bool) -> None:
    """Put the trainable networks in train mode (LoRA dropout on); everything else stays in eval mode."""
    for network in trainable_networks(model, train_text_encoder):
        network.set_train(True)


@contextmanager
def evaluating(model, train_text_encoder: bool):
    """Eval mode for the duration (dropout off), train mode again afterwards."""
    networks = trainable_networks(model, train_text_encoder)
    for network in networks:
        network.set_train(False)
    try:
        yield
    finally:
        for network in networks:
            network.set_train(True)
