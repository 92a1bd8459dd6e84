"""A folder of images, one subfolder per class and split: ``<root>/{train,val[,test]}/<class>/*``.

The layout is checked when the datamodule is built (before anything trains); each split is
decoded once at setup with torchvision (``decode_image``), resized to ``image_size`` and
held in memory as uint8, like the MNIST family, so batches are gathered and normalised on the
device. Without a ``test/`` folder the test split is ``val/``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from vitlab.data.base import InMemoryImageDataModule, InMemoryImages
from vitlab.data.mnist import DataError

log = logging.getLogger(__name__)

#: File endings read as images (torchvision's ImageFolder list); other files are ignored.
IMAGE_EXTENSIONS = tuple(sorted(IMG_EXTENSIONS))
RESIZE_MODES = ("crop", "stretch")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` and below it, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def class_folders(split_dir: Path) -> list[str]:
    """Names of the class subfolders (hidden ones skipped), sorted: the label order."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def load_image(path: str | Path, channels: int, size: int, resize: str = "crop") -> torch.Tensor:
    """One image file as uint8 (channels, size, size): RGB or grayscale whatever its mode,
    EXIF rotation applied, resized (``crop``: shorter side to ``size``, then the centre square;
    ``stretch``: both sides to ``size``)."""
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        image = decode_image(str(path), mode=mode, apply_exif_orientation=True)
    except RuntimeError:
        # Formats torchvision's decoders do not read (BMP, TIFF, PPM/PGM) go through Pillow.
        try:
            with Image.open(path) as pil:
                image = F.pil_to_tensor(pil.convert("RGB" if channels == 3 else "L"))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DataError(f"{path} cannot be read as an image ({err}): replace or delete the file.") from None
    if image.ndim == 4:  # an animated image: its first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNGs
        image = F.to_dtype(image, torch.uint8, scale=True)
    if resize == "stretch":
        return F.resize(image, [size, size], antialias=True).contiguous()
    image = F.resize(image, [size], antialias=True)
    return F.center_crop(image, [size, size]).contiguous()


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


class ImageFolderDataModule(InMemoryImageDataModule):
    """Images in ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (``test/`` optional).

    Class names are the folder names, sorted; every split must have the same class folders.
    ``mean``/``std`` null: computed on the training images at setup.
    """

    def __init__(
        self,
        *,
        root: str | None,
        image_size: int,
        channels: int = 3,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize: str = "crop",
        **kwargs,
    ):
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels}: image folders are read as RGB (3) or grayscale (1).")
        if resize not in RESIZE_MODES:
            raise ValueError(f"data.resize={resize} is not one of {list(RESIZE_MODES)}.")
        if image_size <= 0:
            raise ValueError(f"data.image_size={image_size} must be positive.")
        self.root = self._check_root(root)
        self.files = self._scan()
        classes = class_folders(self.root / "train")
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(
                f"data.num_classes={num_classes} but {self.root / 'train'} has {len(classes)} class folders: "
                f"leave data.num_classes at its default (counted from the folders)."
            )
        self.computed_stats = mean is None or std is None
        super().__init__(
            image_size=image_size,
            channels=channels,
            num_classes=len(classes),
            # Placeholders until setup computes the training images' statistics.
            mean=[0.5] * channels if self.computed_stats else mean,
            std=[0.25] * channels if self.computed_stats else std,
            class_names=classes,
            **kwargs,
        )
        self.resize = resize

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

    def _scan(self) -> dict[str, list[tuple[Path, int]]]:
        """``{split: [(file, label), ...]}``, checking that every class folder holds images and
        that all splits have the same classes."""
        classes = class_folders(self.root / "train")
        if not classes:
            raise DataError(
                f"{self.root / 'train'} has no class folders: put the images of each class in train/<class>/."
            )
        files: dict[str, list[tuple[Path, int]]] = {}
        for split in ("train", "val", "test"):
            split_dir = self.root / split
            if not split_dir.is_dir():
                continue
            found = class_folders(split_dir)
            if found != classes:
                missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
                parts = ([f"missing {missing}"] if missing else []) + ([f"not in train/ {extra}"] if extra else [])
                raise DataError(
                    f"the class folders of {split_dir} differ from those of train/: {'; '.join(parts)}. "
                    f"Every split needs the same class folders."
                )
            files[split] = []
            for label, name in enumerate(classes):
                images = image_files(split_dir / name)
                if not images:
                    raise DataError(
                        f"{split_dir / name} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}): "
                        f"add images or remove the class folder from every split."
                    )
                files[split] += [(path, label) for path in images]
        return files

    def _decode(self, split: str) -> InMemoryImages:
        start = time.perf_counter()
        entries = self.files[split]
        images = torch.empty(len(entries), self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        for i, (path, _) in enumerate(entries):
            images[i] = load_image(path, self.channels, self.image_size, self.resize)
        labels = torch.tensor([label for _, label in entries], dtype=torch.long)
        shape = f"{self.channels}x{self.image_size}x{self.image_size}"
        seconds = time.perf_counter() - start
        log.info(f"{self.root / split}: {len(entries)} images decoded to {shape} in {seconds:.1f} s")
        return InMemoryImages(images, labels)

    @property
    def test_split(self) -> str:
        return "test" if "test" in self.files else "val"

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._decode("val")
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._decode("train")
        if self.computed_stats:  # normalisation by the training images, whatever the stage
            self._set_statistics()
        if stage in (None, "test") and self.test_set is None:
            if self.test_split == "val":
                log.info(f"{self.root} has no test/ folder: the test split is val/.")
            reuse = self.test_split == "val" and self.val_set is not None
            self.test_set = self.val_set if reuse else self._decode(self.test_split)

    def _set_statistics(self) -> None:
        if self.train_set is None:
            self.train_set = self._decode("train")
        mean, std = pixel_statistics(self.train_set.images)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.computed_stats = False
        log.info(f"pixel statistics of {self.root / 'train'}: "
                 f"mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}")


def list_images(path: str | Path, name: str = "input") -> list[Path]:
    """The image files a user points at: one file, or every image in a folder (recursively)."""
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{name}={path} does not exist: pass an image file or a folder of images.")
    if path.is_file():
        return [path]
    files = image_files(path)
    if not files:
        raise DataError(
            f"{name}={path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} in it and its subfolders)."
        )
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Unlabelled image files, decoded and resized when read (each is used once)."""

    def __init__(self, files: Sequence[Path], channels: int, image_size: int, resize: str = "crop"):
        self.files, self.channels, self.image_size, self.resize = list(files), channels, image_size, resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.files[index], self.channels, self.image_size, self.resize)


class ImageFilesDataModule(L.LightningDataModule):
    """Image files of any size and mode for ``trainer.predict``: converted to the model's channels
    and size, normalised on the device with the training statistics."""

    def __init__(self, files: Sequence[Path], *, image_size: int, channels: int, mean: Sequence[float],
                 std: Sequence[float], resize: str = "crop", batch_size: int = 64, num_workers: int = 0):
        super().__init__()
        self.dataset = ImageFiles(files, channels, image_size, resize)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.batch_size, self.num_workers = batch_size, num_workers

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers)

    def on_after_batch_transfer(self, images: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        return (images.float().div_(255) - self.mean.to(images.device)) / self.std.to(images.device)
