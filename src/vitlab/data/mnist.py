"""MNIST and Fashion-MNIST from torchvision's raw layout, read in place.

``<data_dir>/<Name>/raw/*.gz`` is decoded straight from the gzip files into uint8 tensors:
nothing is extracted or written next to them, so the data directory may be read-only.
Missing files are downloaded with torchvision's own mirrors and checksums when a network is
there; otherwise one sentence says which files to put where.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd
from torchvision.datasets.utils import check_integrity, download_url

from vitlab.data.base import InMemoryImages, OfficialSplitDataModule, writable
from vitlab.errors import DataError


def read_idx(path: Path) -> torch.Tensor:
    """Decode one gzip-compressed IDX file (the MNIST file format) into a tensor."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable gzip file ({err}); delete it and download it again.") from err
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":  # the magic number: two zero bytes, 0x08 (unsigned byte)
        raise DataError(f"{path} is not an IDX file of unsigned bytes; delete it and download it again.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise DataError(f"{path} holds {len(raw) - offset} bytes of data for shape {shape}; it is truncated or corrupt.")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape).copy())


class MNISTLikeDataModule(OfficialSplitDataModule):
    """A dataset in MNIST's raw format: 28x28 grayscale, official 60k/10k train/test split."""

    #: torchvision's dataset class: gives the folder name, file names, MD5s and mirrors.
    torchvision_class: type[tvd.MNIST] = tvd.MNIST

    def __init__(self, **kwargs):
        kwargs.setdefault("class_names", self.torchvision_class.classes)
        super().__init__(**kwargs)

    @property
    def raw_folder(self) -> Path:
        return self.data_dir / self.torchvision_class.__name__ / "raw"

    def missing_files(self) -> list[str]:
        return [name for name, _ in self.torchvision_class.resources if not (self.raw_folder / name).is_file()]

    def prepare_data(self) -> None:
        missing = self.missing_files()
        if missing and self.download:
            self._try_download(missing)
            missing = self.missing_files()
        if missing:
            raise DataError(
                f"{self.torchvision_class.__name__} not found and could not be downloaded: put "
                f"{', '.join(missing)} into {self.raw_folder}/ "
                f"(or point VITLAB_DATA_DIR / paths.data_dir at a folder that has {self.torchvision_class.__name__}/raw/)."
            )
        for name, md5 in self.torchvision_class.resources:
            if not check_integrity(str(self.raw_folder / name), md5):
                raise DataError(
                    f"{self.raw_folder / name} does not match the official MD5 {md5}: "
                    f"the file is corrupt or a different version; delete it and download it again."
                )

    def _try_download(self, missing: list[str]) -> None:
        if not writable(self.raw_folder):
            return
        md5s = dict(self.torchvision_class.resources)
        for name in missing:
            for mirror in self.torchvision_class.mirrors:
                try:
                    download_url(f"{mirror}{name}", str(self.raw_folder), filename=name, md5=md5s[name])
                    break
                except Exception:  # noqa: BLE001 - any network failure means: try the next mirror
                    (self.raw_folder / name).unlink(missing_ok=True)

    def _load(self, train: bool) -> InMemoryImages:
        prefix = "train" if train else "t10k"
        images = read_idx(self.raw_folder / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(self.raw_folder / f"{prefix}-labels-idx1-ubyte.gz")
        return InMemoryImages(images.unsqueeze(1), labels)


class MNISTDataModule(MNISTLikeDataModule):
    torchvision_class = tvd.MNIST


class FashionMNISTDataModule(MNISTLikeDataModule):
    torchvision_class = tvd.FashionMNIST
