"""A folder of images, one subfolder per class and split: ``<root>/{train,val[,test]}/<class>/*``.

The layout is checked when the datamodule is built (before anything trains). Then, by
``in_memory``:

- in memory: each split is decoded once at setup with torchvision, resized to ``image_size``
  and held as uint8, like the MNIST family, so batches are gathered and normalised on the
  device;
- streaming: files are read and decoded per sample in DataLoader workers, with the training
  crop and flip drawn per image there (``vitlab.data.transforms``), so memory does not grow
  with the dataset and each crop sees the full-resolution image;
- ``auto``: in memory when all decoded splits fit in ``memory_budget_gb`` (default: a quarter
  of this machine's RAM), else streaming; the log gives the sizes that decided.

Without a ``test/`` folder the test split is ``val/``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import read_file

from vitlab.data.base import InMemoryImageDataModule, InMemoryImages
from vitlab.errors import BadImageError, DataError
from vitlab.data.loading import BAD_FILE_POLICIES, collate_encoded, collate_samples, index_of, read_sample, seed_of
from vitlab.data.transforms import DECODE_ON, RESIZE_MODES, SampleTransform, decode, decode_batch, resize_to

log = logging.getLogger(__name__)

#: File endings read as images (torchvision's ImageFolder list); other files are ignored.
IMAGE_EXTENSIONS = tuple(sorted(IMG_EXTENSIONS))
IN_MEMORY_CHOICES = ("auto", True, False)
#: Training images decoded to estimate the normalisation statistics of a streamed folder.
STATISTICS_SAMPLE = 2000


def image_files(folder: Path) -> list[Path]:
    """Image files (not hidden ones) directly in ``folder`` and below it, sorted."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def class_folders(split_dir: Path) -> list[str]:
    """Names of the class subfolders (hidden ones skipped), sorted: the label order."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def read_image(path: str | Path, channels: int) -> torch.Tensor:
    """One image file decoded to uint8 ``(channels, H, W)`` at its own size."""
    try:
        data = read_file(str(path))
    except (OSError, RuntimeError) as err:
        raise BadImageError(f"{path} cannot be read ({err}): check the file's permissions or replace it.") from None
    return decode(data, channels, name=str(path))


def load_image(path: str | Path, channels: int, size: int, resize: str = "crop") -> torch.Tensor:
    """One image file as uint8 (channels, size, size): RGB or grayscale whatever its mode,
    EXIF rotation applied, resized (``crop``: shorter side to ``size``, then the centre square;
    ``stretch``: both sides to ``size``)."""
    return resize_to(read_image(path, channels), size, resize)


class FileList(Sequence):
    """``(path, label)`` pairs of one split, held as two numpy arrays (byte-string paths and
    int64 labels) rather than a list of Python objects: about a fifth of the memory, and forked
    workers share the pages instead of copying them as reference counts change."""

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int]):
        self.paths = np.array([os.fsencode(p) for p in paths]) if len(paths) else np.array([], dtype="S1")
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Path, int]:
        return Path(os.fsdecode(self.paths[index])), int(self.labels[index])


class ImageFileDataset(Dataset):
    """Labelled image files (a ``FileList``) read per sample: ``dataset[key] -> (image, label, skipped)``."""

    def __init__(self, files: Sequence[tuple[Path, int]], channels: int, transform, on_bad_file: str = "error",
                 decode_on: str = "workers"):
        files = files if isinstance(files, FileList) else FileList([p for p, _ in files], [lb for _, lb in files])
        self.paths, self.labels = files.paths, files.labels
        self.channels, self.transform, self.on_bad_file, self.decode_on = channels, transform, on_bad_file, decode_on

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return os.fsdecode(self.paths[index])

    def _read(self, index: int, seed: int | None):
        return self.transform(read_image(self.path(index), self.channels), seed), int(self.labels[index])

    def __getitem__(self, key):
        if self.decode_on == "device":
            # The file's bytes only: decoded and transformed on the training device, per batch.
            # Plain bytes: they travel from the workers pickled, not as shared-memory tensors.
            index = index_of(key)
            try:
                data = Path(self.path(index)).read_bytes()
            except OSError as err:
                raise BadImageError(f"{self.path(index)} cannot be read ({err}): check or replace the file.") from None
            return data, int(self.labels[index]), seed_of(key), index
        return read_sample(self._read, key, len(self), self.on_bad_file)


def pixel_statistics(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the [0, 1] scale of uint8 images (N, C, H, W), in chunks."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].double().div_(255)
        total += block.sum(dim=(0, 2, 3))
        squares += block.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def use_statistics(datamodule: InMemoryImageDataModule, images: torch.Tensor, where: str) -> None:
    """Normalise ``datamodule``'s batches by the statistics of ``images`` (training images)."""
    mean, std = pixel_statistics(images)
    datamodule.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    datamodule.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    datamodule.computed_stats = False
    log.info(f"pixel statistics of {where}: mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}")


class ImageFolderDataModule(InMemoryImageDataModule):
    """Images in ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (``test/`` optional).

    Class names are the folder names, sorted; every split must have the same class folders.
    ``mean``/``std`` null: computed on the training images at setup (on a seeded sample of
    ``STATISTICS_SAMPLE`` of them when streaming). ``num_workers`` null: none in memory, up to
    4 (one per core) when streaming.
    """

    def __init__(self, *, root: str | None, image_size: int, channels: int = 3, num_classes: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, resize: str = "crop",
                 in_memory: str | bool = "auto", memory_budget_gb: float | None = None,
                 train_crop: str = "random_resized", scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: bool = True, crop_pct: float = 0.875,
                 on_bad_file: str = "error", decode_on: str = "workers", num_workers: int | None = None, **kwargs):
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels}: image folders are read as RGB (3) or grayscale (1).")
        if resize not in RESIZE_MODES:
            raise ValueError(f"data.resize={resize} is not one of {list(RESIZE_MODES)}.")
        if image_size <= 0:
            raise ValueError(f"data.image_size={image_size} must be positive.")
        if in_memory not in IN_MEMORY_CHOICES:
            raise ValueError(f"data.in_memory={in_memory} is not one of auto, true, false.")
        if on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(f"data.on_bad_file={on_bad_file} is not one of {list(BAD_FILE_POLICIES)}.")
        if decode_on not in DECODE_ON:
            raise ValueError(f"data.decode_on={decode_on} is not one of {list(DECODE_ON)}.")
        if memory_budget_gb is not None and not memory_budget_gb > 0:
            raise ValueError(f"data.memory_budget_gb={memory_budget_gb} must be positive (null: a quarter of RAM).")
        self.root = self._check_root(root)
        self.files = self._scan()
        classes = class_folders(self.root / "train")
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"data.num_classes={num_classes} but {self.root / 'train'} has {len(classes)} class "
                             f"folders: leave data.num_classes at its default (counted from the folders).")
        self.computed_stats = mean is None or std is None
        self.resize = resize
        self.on_bad_file = on_bad_file
        self.streaming = self._choose_streaming(in_memory, memory_budget_gb, image_size, channels)
        self.decode_on = decode_on if self.streaming else "workers"
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1) if self.streaming else 0
        super().__init__(image_size=image_size, channels=channels, num_classes=len(classes), class_names=classes,
                         # Placeholders until setup computes the training images' statistics.
                         mean=[0.5] * channels if self.computed_stats else mean,
                         std=[0.25] * channels if self.computed_stats else std, num_workers=num_workers, **kwargs)
        if self.streaming:
            self.collate_fn = collate_encoded if self.decode_on == "device" else collate_samples
            options = dict(resize=resize, crop_pct=crop_pct, scale=scale, ratio=ratio, train_crop=train_crop)
            self.train_transform = SampleTransform(image_size, train=True, hflip=hflip, **options)
            self.eval_transform = SampleTransform(image_size, train=False, **options)

    def _choose_streaming(self, in_memory, budget_gb: float | None, image_size: int, channels: int) -> bool:
        images = sum(len(entries) for entries in self.files.values())
        decoded = images * channels * image_size * image_size
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget = budget_gb * 2**30 if budget_gb is not None else ram / 4
        sizes = (f"{images} images, {decoded / 2**30:.2f} GiB decoded at {channels}x{image_size}x{image_size}, "
                 f"budget {budget / 2**30:.2f} GiB")
        if in_memory == "auto":
            streaming = decoded > budget
            log.info(f"{self.root}: {'streaming from disk' if streaming else 'decoded into memory'} "
                     f"(data.in_memory=auto: {sizes})")
            return streaming
        if in_memory and decoded > budget:
            log.warning(f"{self.root}: data.in_memory=true holds {sizes}; data.in_memory=auto would stream it.")
        return not in_memory

    @staticmethod
    def _check_root(root: str | None) -> Path:
        layout = "a folder with train/<class>/ and val/<class>/ subfolders of images (test/ optional)"
        if not root:
            raise DataError(f"data=imagefolder needs data.root=<dir>: {layout}.")
        path = Path(str(root)).expanduser()
        if not path.is_dir():
            raise DataError(f"data.root={path} does not exist: point it at {layout}.")
        for split in ("train", "val"):
            if not (path / split).is_dir():
                raise DataError(f"data.root={path} has no {split}/ folder: an image folder needs {layout}.")
        return path

    def _scan(self) -> dict[str, FileList]:
        """``{split: [(file, label), ...]}``, checking that every class folder holds images and
        that all splits have the same classes."""
        classes = class_folders(self.root / "train")
        if not classes:
            raise DataError(f"{self.root / 'train'} has no class folders: put the images of each class in "
                            f"train/<class>/.")
        files: dict[str, FileList] = {}
        for split in ("train", "val", "test"):
            split_dir = self.root / split
            if not split_dir.is_dir():
                continue
            found = class_folders(split_dir)
            if found != classes:
                missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
                parts = ([f"missing {missing}"] if missing else []) + ([f"not in train/ {extra}"] if extra else [])
                raise DataError(f"the class folders of {split_dir} differ from those of train/: {'; '.join(parts)}. "
                                f"Every split needs the same class folders.")
            paths, labels = [], []
            for label, name in enumerate(classes):
                images = image_files(split_dir / name)
                if not images:
                    raise DataError(f"{split_dir / name} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}): "
                                    f"add images or remove the class folder from every split.")
                paths += images
                labels += [label] * len(images)
            files[split] = FileList(paths, labels)
        return files

    def _decode(self, split: str) -> InMemoryImages:
        start = time.perf_counter()
        entries = self.files[split]
        images = torch.empty(len(entries), self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        kept = []
        for path, label in entries:
            try:
                images[len(kept)] = load_image(path, self.channels, self.image_size, self.resize)
            except BadImageError:
                if self.on_bad_file != "skip":
                    raise
                self.skipped_files[f"{split}:{path}"] = str(path)
                log.warning(f"skipped an unreadable file (data.on_bad_file=skip): {path}")
                continue
            kept.append(label)
        labels = torch.tensor(kept, dtype=torch.long)
        shape = f"{self.channels}x{self.image_size}x{self.image_size}"
        seconds = time.perf_counter() - start
        log.info(f"{self.root / split}: {len(kept)} images decoded to {shape} in {seconds:.1f} s")
        return InMemoryImages(images[: len(kept)].clone() if len(kept) < len(entries) else images, labels)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """With ``decode_on=device``: decode the batch's files on the training device and crop
        them there (the same seeded transforms as in the workers); an undecodable file stops the
        run or, with ``on_bad_file=skip``, leaves the batch."""
        if self.decode_on != "device" or self.trainer is None:
            return batch
        encoded, labels, seeds, indices = batch
        trainer = self.trainer
        dataset = getattr(self, f"{self.current_split}_set")
        transform = self.train_transform if trainer.training else self.eval_transform
        names = [dataset.path(int(i)) for i in indices]
        images = decode_batch(encoded, self.channels, trainer.strategy.root_device, names)
        kept, skipped = [], []
        for image, index, seed in zip(images, indices.tolist(), seeds.tolist()):
            if isinstance(image, BadImageError):
                if self.on_bad_file != "skip":
                    raise image
                skipped.append(index)
                continue
            kept.append((transform(image, seed if seed >= 0 else None), len(kept) + len(skipped)))
        keep = torch.tensor([position for _, position in kept], dtype=torch.long)
        return torch.stack([image for image, _ in kept]), labels[keep], skipped

    def _split(self, split: str) -> InMemoryImages | ImageFileDataset:
        if not self.streaming:
            return self._decode(split)
        transform = self.train_transform if split == "train" else self.eval_transform
        return ImageFileDataset(self.files[split], self.channels, transform, self.on_bad_file, self.decode_on)

    def describe_file(self, item, split: str) -> str:
        dataset = getattr(self, f"{split}_set", None)
        return dataset.path(int(item)) if isinstance(dataset, ImageFileDataset) else f"{split} sample {item}"

    @property
    def test_split(self) -> str:
        return "test" if "test" in self.files else "val"

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._split("val")
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._split("train")
        if self.computed_stats:  # normalisation by the training images, whatever the stage
            self._set_statistics()
        if stage in (None, "test") and self.test_set is None:
            if self.test_split == "val":
                log.info(f"{self.root} has no test/ folder: the test split is val/.")
            reuse = self.test_split == "val" and self.val_set is not None
            self.test_set = self.val_set if reuse else self._split(self.test_split)

    def _set_statistics(self) -> None:
        if self.train_set is None:
            self.train_set = self._split("train")
        if self.streaming:
            # A seeded sample of the training images, resized as for evaluation.
            dataset = ImageFileDataset(self.files["train"], self.channels, self.eval_transform, self.on_bad_file)
            count = min(len(dataset), STATISTICS_SAMPLE)
            picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))[:count]
            images = torch.stack([dataset[int(i)][0] for i in picks])
            where = f"{count} of the {len(dataset)} images of {self.root / 'train'}"
        else:
            images, where = self.train_set.images, str(self.root / "train")
        use_statistics(self, images, where)


def list_images(path: str | Path, name: str = "input") -> list[Path]:
    """The image files a user points at: one file, or every image in a folder (recursively)."""
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{name}={path} does not exist: pass an image file or a folder of images.")
    if path.is_file():
        return [path]
    files = image_files(path)
    if not files:
        raise DataError(f"{name}={path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} in it and its "
                        f"subfolders).")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Unlabelled image files, decoded and resized when read (each is used once): as the run's
    evaluation images were (``transform``: a ``SampleTransform`` for a streamed run), else
    resized to ``image_size`` by ``resize``."""

    def __init__(self, files: Sequence[Path], channels: int, image_size: int, resize: str = "crop", transform=None):
        self.files, self.channels, self.image_size, self.resize = list(files), channels, image_size, resize
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = read_image(self.files[index], self.channels)
        return self.transform(image) if self.transform else resize_to(image, self.image_size, self.resize)


class ImageFilesDataModule(L.LightningDataModule):
    """Image files of any size and mode for ``trainer.predict``: converted to the model's channels
    and size, normalised on the device with the training statistics."""

    def __init__(self, files: Sequence[Path], *, image_size: int, channels: int, mean: Sequence[float],
                 std: Sequence[float], resize: str = "crop", batch_size: int = 64, num_workers: int = 0,
                 transform=None):
        super().__init__()
        self.dataset = ImageFiles(files, channels, image_size, resize, transform)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.batch_size, self.num_workers = batch_size, num_workers

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers)

    def on_after_batch_transfer(self, images: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        return (images.float().div_(255) - self.mean.to(images.device)) / self.std.to(images.device)
