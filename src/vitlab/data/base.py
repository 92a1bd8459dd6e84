"""Image datamodules: loaders, on-device normalisation and augmentation, shared by the
datasets held in memory and those read per sample.

In memory, a DataLoader with automatic batching hands the whole list of indices of a batch to
``Dataset.__getitems__``, so one tensor gather builds the batch. Either way batches arrive as
uint8 and are normalised and augmented batch-wise on the training device in
``on_after_batch_transfer``. Training loaders resume in the middle of an epoch
(``vitlab.data.loading``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitlab.data.augment import Augmentations
from vitlab.data.loading import ResumePoint, index_of, train_loader

log = logging.getLogger(__name__)


class InMemoryImages(Dataset):
    """uint8 images (N, C, H, W) with int64 labels (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, keys: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        # Keys are indices, or (index, seed) pairs from the training sampler.
        index = torch.as_tensor([index_of(k) for k in keys])
        return self.images[index], self.labels[index]


def keep_batch(batch):
    """collate_fn for datasets whose ``__getitems__`` already returns a whole batch."""
    return batch


def split(dataset: InMemoryImages, val_size: int, seed: int) -> tuple[InMemoryImages, InMemoryImages]:
    """Seeded random train/val split of an in-memory dataset."""
    if not 0 <= val_size < len(dataset):
        raise ValueError(f"data.val_size={val_size} must be between 0 and {len(dataset) - 1}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    val, train = order[:val_size], order[val_size:]
    images, labels = dataset.images, dataset.labels
    return InMemoryImages(images[train], labels[train]), InMemoryImages(images[val], labels[val])


def subset(dataset: InMemoryImages, size: int, seed: int) -> InMemoryImages:
    """``size`` images of the dataset, as many of each class as can be (the first of a seeded
    shuffle within each class; the remainder, if ``size`` does not divide evenly, by the same
    shuffle), kept in the dataset's order: a few-label training split that is the same for
    every run with this seed."""
    if size > len(dataset):
        raise ValueError(f"data.train_subset={size} is more than the {len(dataset)} training images: choose at most "
                         f"{len(dataset)}, or null for all of them.")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    labels = dataset.labels[order]
    # Rank of each image within its class in the shuffled order: take the lowest ranks first.
    rank = torch.empty_like(labels)
    for label in labels.unique():
        where = (labels == label).nonzero().flatten()
        rank[where] = torch.arange(len(where))
    chosen = order[torch.sort(rank * len(dataset) + torch.arange(len(dataset)), stable=True).indices[:size]]
    chosen = chosen.sort().values
    return InMemoryImages(dataset.images[chosen], dataset.labels[chosen])


class InMemoryImageDataModule(L.LightningDataModule):
    """Shared loaders and on-device normalisation.

    Subclasses fill ``self.train_set``, ``self.val_set`` and ``self.test_set`` in ``setup``:
    ``InMemoryImages`` (batched by ``__getitems__``), or datasets read per sample with
    ``collate_fn`` set (``vitlab.data.loading.collate_samples``), whose batches also list the
    files skipped by ``on_bad_file=skip``: they are logged once and counted in
    ``skipped_files``. ``seed`` orders the training batches (with the epoch).
    """

    def __init__(self, *, image_size: int, channels: int, num_classes: int, mean: Sequence[float],
                 std: Sequence[float], batch_size: int = 128, eval_batch_size: int | None = None,
                 num_workers: int = 0, pin_memory: bool = False, class_names: Sequence[str] | None = None,
                 augment: Mapping[str, nn.Module | None] | Sequence[nn.Module] | nn.Module | None = None,
                 seed: int = 0):
        super().__init__()
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"data.mean={list(mean)} and data.std={list(std)} need one value per channel ({channels})")
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.collate_fn = keep_batch
        self.resume = ResumePoint()
        #: Drop each epoch's smaller last training batch: ``train.build`` sets it for a compiled
        #: network, which would otherwise compile a second training graph for that batch's shape.
        self.drop_last = False
        #: ``"<split>:<index>"`` -> file of each unreadable file skipped so far (this process).
        self.skipped_files: dict[str, str] = {}
        # Training batches only, on the device (vitlab.data.augment: crop/flip and RandAugment
        # on the uint8 pixels, erasing after normalisation, MixUp/CutMix last: soft targets).
        self.augment = Augmentations(augment) if augment else None
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.train_set: InMemoryImages | None = None
        self.val_set: InMemoryImages | None = None
        self.test_set: InMemoryImages | None = None

    def _loader(self, dataset, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("the datamodule has not been set up for this stage")
        if train:
            return train_loader(dataset, batch_size=self.batch_size, seed=self.seed, trainer=self.trainer,
                                resume=self.resume, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                collate_fn=self.collate_fn, drop_last=self.drop_last)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, drop_last=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, collate_fn=self.collate_fn)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().div_(255) - self.mean.to(images.device)) / self.std.to(images.device)

    def describe_file(self, item, split: str) -> str:
        """How a skipped sample (as the batch reports it: an index, or a name) is named in the
        log and in metrics.json (subclasses: its file)."""
        return f"{split} sample {item}"

    @property
    def current_split(self) -> str:
        """The split the trainer is reading now: ``train``, ``val`` or ``test``."""
        trainer = self.trainer
        return "train" if trainer is None or trainer.training else "test" if trainer.testing else "val"

    def note_skipped(self, items: Sequence) -> None:
        split = self.current_split
        for item in items:
            key = f"{split}:{item}"
            if key not in self.skipped_files:
                self.skipped_files[key] = self.describe_file(item, split)
                log.warning(f"skipped an unreadable file (data.on_bad_file=skip): {self.skipped_files[key]}")

    def state_dict(self) -> dict:
        """Saved in every checkpoint by Lightning: where in the epoch training stands."""
        per_epoch = self.trainer.num_training_batches if self.trainer is not None else float("inf")
        return {"resume": self.resume.state_dict(per_epoch)}

    def load_state_dict(self, state_dict: dict) -> None:
        if "resume" in state_dict:
            self.resume.load_state_dict(state_dict["resume"])

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, *skipped = batch
        if skipped and skipped[0]:
            self.note_skipped(skipped[0])
        training = self.trainer is not None and self.trainer.training
        if training:
            self.resume.took_batch(getattr(self.trainer, "current_epoch", 0))
        if self.augment is not None and training:
            return self.augment(images, labels, self.normalize)
        return self.normalize(images), labels


class OfficialSplitDataModule(InMemoryImageDataModule):
    """A dataset with an official train and test set, read in place from ``data_dir`` by the
    subclass's ``_load(train)``: the train set split (seeded) into train and validation, the
    test set as the test split."""

    def __init__(self, *, data_dir: str, val_size: int = 5000, split_seed: int = 0, download: bool = True,
                 train_subset: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if train_subset is not None and (isinstance(train_subset, bool) or not isinstance(train_subset, int)
                                         or train_subset <= 0):
            raise ValueError(f"data.train_subset={train_subset!r} must be null (the whole training split) or a "
                             f"positive number of labelled training images, e.g. 1000.")
        self.data_dir = Path(data_dir).expanduser()
        self.val_size, self.split_seed, self.download = val_size, split_seed, download
        self.train_subset = train_subset

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            self.train_set, self.val_set = split(self._load(train=True), self.val_size, self.split_seed)
            if self.train_subset is not None:
                self.train_set = subset(self.train_set, self.train_subset, self.split_seed)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._load(train=False)


def writable(folder: Path) -> bool:
    """Whether downloads can go into ``folder`` (made if missing): not in a read-only data
    directory, where the caller reports what is missing instead."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)
