"""The order of a run's samples: which sample ids each rank visits, in which batches, over all epochs.

Every sample is addressed by a *sample id* ``epoch * N + index`` (``N`` records). :class:`ShardedSampler` shuffles
the records each epoch; :class:`BucketSampler` makes batches inside aspect-ratio buckets and shuffles the batches.
Both are stateless and seeded by ``(seed, epoch)``, split each global batch over ranks the same way (rank ``r`` takes
positions ``r::world_size`` of it, so N ranks with batch B reproduce one process with batch N*B), and resume by
skipping the first ``batches_done`` batches of this rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np


class ShardedSampler:
    """Sample ids ``epoch * N + index`` for this rank over a whole run of ``num_epochs`` epochs.

    Each epoch's order (shuffled per epoch, or sequential) is split over ranks as ``order[rank::world_size]``. With
    ``drop_last`` an epoch keeps the largest multiple of ``world_size * batch_size`` samples, otherwise it is padded
    by wrapping around to a multiple of ``world_size``; every rank gets the same count either way. The first
    ``batches_done * batch_size`` ids of the run are skipped (resume). The sampler is stateless: MindSpore calls
    ``iter()`` more than once while building a pipeline, and each call yields the same sequence.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        num_epochs: int = 1,
        batches_done: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or num_samples < 1 or num_epochs < 1:
            raise ValueError(
                f"need batch_size, num_samples and num_epochs >= 1, got {batch_size}, {num_samples}, {num_epochs}"
            )
        self.num_samples, self.batch_size, self.shuffle, self.seed = num_samples, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.num_epochs = rank, world_size, drop_last, num_epochs
        self.per_rank = self._per_rank()
        self.start = int(batches_done) * batch_size
        if not 0 <= self.start < self.per_rank * num_epochs:
            raise ValueError(
                f"batches_done={batches_done} is outside a run of {num_epochs} epochs of "
                f"{self.per_rank} samples per rank"
            )

    def _per_rank(self) -> int:
        """Samples each rank visits per epoch."""
        if not self.drop_last:
            return -(-self.num_samples // self.world_size)
        per_rank = self.num_samples // (self.world_size * self.batch_size) * self.batch_size
        if per_rank == 0:
            raise ValueError(
                f"{self.num_samples} samples cannot fill one global batch of {self.world_size}x{self.batch_size} "
                "with drop_last"
            )
        return per_rank

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's record indices for ``epoch``."""
        n = self.num_samples
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        order = np.resize(order, self.per_rank * self.world_size)  # trims (drop_last) or wraps around (padding)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return self.per_rank * self.num_epochs - self.start

    def __iter__(self) -> Iterator[int]:
        first, skip = divmod(self.start, self.per_rank)
        for epoch in range(first, self.num_epochs):
            ids = self.epoch_indices(epoch)[skip if epoch == first else 0 :] + epoch * self.num_samples
            yield from ids.tolist()


class BucketSampler(ShardedSampler):
    """Batches that each hold one aspect-ratio bucket, in a seeded shuffled order (kohya's bucket batching).

    ``buckets[i]`` is record ``i``'s bucket. Each epoch, every bucket's records are shuffled and cut into global
    batches of ``world_size * batch_size``; a bucket's last global batch is filled up with its own first records
    again (kohya trains a smaller batch instead, which would be one more graph shape). Then the global batches of all
    buckets are shuffled together, and rank ``r`` takes positions ``r::world_size`` of each, so at every step all
    ranks train the same bucket. Without ``shuffle`` buckets come in sorted order, records in index order.
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int = 1, shuffle: bool = True, **kwargs):
        buckets = [tuple(b) for b in buckets]
        self.groups = [np.flatnonzero([b == bucket for b in buckets]) for bucket in sorted(set(buckets))]
        self.digest = hashlib.sha256(repr(list(buckets)).encode()).hexdigest()[:16]
        super().__init__(len(buckets), batch_size, shuffle, drop_last=False, **kwargs)

    def _per_rank(self) -> int:
        global_batch = self.world_size * self.batch_size
        return sum(-(-len(g) // global_batch) for g in self.groups) * self.batch_size

    def epoch_indices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        global_batch = self.world_size * self.batch_size
        batches = []
        for group in self.groups:
            order = rng.permutation(group) if self.shuffle else group
            order = np.resize(order, -(-len(order) // global_batch) * global_batch)
            batches += np.split(order, len(order) // global_batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return np.concatenate([b[self.rank :: self.world_size] for b in batches])


@dataclass(frozen=True)
class RunOrder:
    """What a run's sampler is built from: batch size, shuffling and seed, this rank among ``world_size``, whether
    an epoch's last partial global batch is dropped (unused with buckets), the run's epochs and the batches this rank
    already consumed (resume)."""

    batch_size: int = 1
    shuffle: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True
    num_epochs: int = 1
    batches_done: int = 0

    def sampler(self, num_samples: int, buckets: Sequence[tuple[int, int]] | None = None) -> ShardedSampler:
        """The sampler of ``num_samples`` records, or of records in ``buckets`` (one bucket per batch)."""
        if buckets is None:
            return ShardedSampler(num_samples, **asdict(self))
        settings = {k: v for k, v in asdict(self).items() if k != "drop_last"}
        return BucketSampler(buckets, **settings)
