"""Training loaders that resume exactly, and the bad-file policy of datasets read per sample.

- ``EpochSampler``: the training order is a function of the run's seed and the epoch alone
  (a seeded permutation, split across DDP ranks like ``DistributedSampler``). The datamodule
  counts the training batches the trainer has taken in the epoch (``ResumePoint``) and keeps
  that count in every checkpoint; a run stopped in the middle of an epoch restarts the epoch's
  permutation after those batches, so it trains on exactly the batches the uninterrupted run
  would have drawn. Counting what the trainer consumed, rather than what the loader produced,
  keeps batches that Lightning and the workers fetched ahead out of the count.
- Each index comes with a per-sample seed (from seed, epoch and index) for the random crop and
  flip done in the workers, so augmentation does not depend on which worker reads a sample.
- ``on_bad_file``: a file that cannot be decoded is found when it is read. ``error`` stops the
  run naming it; ``skip`` reads another sample in its place (chosen from the sample's seed, so
  a resumed run replaces it the same way) and reports the file, which the datamodule logs once
  and counts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler

from vitlab.errors import BadImageError

BAD_FILE_POLICIES = ("error", "skip")
#: Replacement samples tried for one unreadable file before the run stops anyway.
MAX_REPLACEMENTS = 16


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (stable across processes and Python runs)."""
    return random.Random(f"{seed}/{epoch}/{index}").getrandbits(63)


class EpochSampler(DistributedSampler):
    """Shuffled training indices, a function of ``seed`` and the epoch, as ``(index, seed)`` pairs.

    A ``DistributedSampler`` (so Lightning leaves it in place under DDP: each of
    ``num_replicas`` ranks reads its own share; the last, shorter share is padded with samples
    from the start as ``DistributedSampler`` does). ``resume`` says where the first iteration
    starts: in epoch ``resume.epoch``, after ``resume.batches`` batches of ``batch_size``.
    """

    def __init__(self, dataset, *, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 resume: ResumePoint | None = None, batch_size: int = 1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.resume, self.batch_size = resume, batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = 0
        if self.resume is not None and self.resume.pending:
            # The first iteration after a restore continues the restored epoch. (With worker
            # processes it begins when the loader is first iterated, before Lightning sets the
            # epoch, so the epoch is taken from the restored state.)
            self.set_epoch(self.resume.epoch)
            start = self.resume.batches * self.batch_size
            self.resume.pending = False
        epoch = self.epoch
        for index in list(super().__iter__())[start:]:
            yield index, sample_seed(self.seed, epoch, index)


class ResumePoint:
    """The training batches the trainer has taken in the current epoch, counted where the
    datamodule hands them over (``on_after_batch_transfer``); saved in checkpoints through the
    datamodule's ``state_dict``."""

    def __init__(self) -> None:
        self.epoch, self.batches, self.pending = 0, 0, False

    def took_batch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0
        self.batches += 1

    def state_dict(self, batches_per_epoch: float = float("inf")) -> dict[str, int]:
        """Where training continues: after ``batches`` of ``epoch`` (a finished epoch: the next
        one, from its start)."""
        if self.batches >= batches_per_epoch:
            return {"epoch": self.epoch + 1, "batches": 0}
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches, self.pending = int(state["epoch"]), int(state["batches"]), True


def index_of(key) -> int:
    """The dataset index of a sampler key: an ``(index, seed)`` pair or a plain index."""
    return int(key[0]) if isinstance(key, (tuple, list)) else int(key)


def seed_of(key) -> int | None:
    return int(key[1]) if isinstance(key, (tuple, list)) else None


def train_loader(dataset, *, batch_size: int, seed: int, trainer, resume: ResumePoint | None = None,
                 num_workers: int = 0, pin_memory: bool = False, collate_fn: Callable | None = None,
                 drop_last: bool = False) -> DataLoader:
    """A resumable training loader over ``dataset`` (an ``EpochSampler``). Under DDP the
    sampler is given the trainer's world size and rank. ``drop_last`` drops each epoch's
    smaller last batch (its images are others in the next epoch's order)."""
    # A datamodule used without a Trainer (a benchmark, a test): one process.
    world, rank = getattr(trainer, "world_size", 1), getattr(trainer, "global_rank", 0)
    sampler = EpochSampler(dataset, seed=seed, num_replicas=world, rank=rank, resume=resume, batch_size=batch_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=num_workers > 0, collate_fn=collate_fn,
        # The loader's own generator: making its iterator never draws from the global one,
        # which the on-device augmentation uses (and checkpoints restore).
        generator=torch.Generator().manual_seed(seed),
    )


def read_sample(read: Callable[[int, int | None], tuple[torch.Tensor, int]], key, size: int, policy: str):
    """``read(index, seed) -> (image, label)`` for a sampler key under the bad-file policy:
    ``(image, label, skipped_indices)``."""
    index, seed = index_of(key), seed_of(key)
    skipped: list[int] = []
    rng = random.Random(seed if seed is not None else index)
    for _ in range(MAX_REPLACEMENTS + 1):
        try:
            image, label = read(index, seed)
            return image, label, skipped
        except BadImageError:
            if policy != "skip":
                raise
            skipped.append(index)
            index = rng.randrange(size)
    raise BadImageError(f"{MAX_REPLACEMENTS + 1} files in a row could not be read (the last at index {index}): "
                        f"the data is damaged beyond data.on_bad_file=skip; check the folder or shards.")


def collate_samples(samples: Sequence[tuple[torch.Tensor, int, list[int]]]):
    """``(images (B, C, S, S) uint8, labels (B,), skipped indices)`` from per-sample reads."""
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([int(s[1]) for s in samples], dtype=torch.long)
    return images, labels, [i for s in samples for i in s[2]]


def collate_encoded(samples: Sequence[tuple[torch.Tensor, int, int | None, int]]):
    """``(encoded files, labels (B,), seeds (B,), indices (B,))`` for ``decode_on=device``: the
    datamodule decodes the files on the device before the batch is moved there."""
    return ([s[0] for s in samples], torch.tensor([int(s[1]) for s in samples], dtype=torch.long),
            torch.tensor([-1 if s[2] is None else int(s[2]) for s in samples], dtype=torch.long),
            torch.tensor([int(s[3]) for s in samples], dtype=torch.long))
