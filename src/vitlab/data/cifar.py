"""CIFAR-10 and CIFAR-100 from the official "python version" files, read in place.

``<data_dir>/cifar-10-batches-py/`` (torchvision's extracted layout) is read if it is
complete, else the official ``<data_dir>/cifar-10-python.tar.gz`` is read without extracting
it; nothing is written next to them, so the data directory may be read-only. Missing data is
downloaded (the archive only, with torchvision's URL and checksum) when the folder is
writable; otherwise one sentence says which files to put where.

The official files are Python pickles. Unpickling can run arbitrary code, so they are read
with an unpickler that builds nothing but what those files hold: dicts, lists, strings,
bytes, numbers and numpy arrays (numpy's array reconstructor, ``ndarray`` and ``dtype`` are
the only globals it resolves); any other global refuses the file.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd
from torchvision.datasets.utils import check_integrity, download_url

from vitlab.data.base import InMemoryImages, OfficialSplitDataModule, writable
from vitlab.errors import DataError

# numpy's array reconstructor under every module path a pickle may name it by: numpy 1
# (which wrote the official files) and numpy 2.
_reconstruct = np.zeros(1).__reduce__()[0]
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the numpy globals an array needs (``SAFE_GLOBALS``); refuses the rest."""

    def find_class(self, module: str, name: str):
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a CIFAR file")


def load_pickle(raw: bytes, source: str) -> dict:
    """Decode one official CIFAR file (a Python 2 pickle of a dict) without running code."""
    try:
        # latin1: the files were written by Python 2; its byte strings become str.
        entry = RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as err:  # noqa: BLE001 - any decoding failure: the file is not a CIFAR file
        raise DataError(f"{source} is not a valid CIFAR file ({err}); delete it and download it again.") from err
    if not isinstance(entry, dict):
        raise DataError(f"{source} holds a {type(entry).__name__}, not the dict of a CIFAR file; delete it and download it again.")
    return entry


class CIFARDataModule(OfficialSplitDataModule):
    """A CIFAR dataset: 32x32 RGB."""

    #: torchvision's dataset class: gives the folder and archive names, file MD5s and URL.
    torchvision_class: type[tvd.CIFAR10] = tvd.CIFAR10
    #: Key of the labels in the batch files and display name.
    label_key = "labels"
    title = "CIFAR-10"

    def __init__(self, *, verify_md5: bool = True, **kwargs):
        super().__init__(**kwargs)
        # Off only for files that are not the official ones (the tests' generated files).
        self.verify_md5 = verify_md5

    @property
    def folder(self) -> Path:
        return self.data_dir / self.torchvision_class.base_folder

    @property
    def archive(self) -> Path:
        return self.data_dir / self.torchvision_class.filename

    def file_md5s(self) -> dict[str, str]:
        tv = self.torchvision_class
        return {**dict(tv.train_list), **dict(tv.test_list), tv.meta["filename"]: tv.meta["md5"]}

    def source(self) -> Path | None:
        """The complete extracted folder, else the archive, else None."""
        if all((self.folder / name).is_file() for name in self.file_md5s()):
            return self.folder
        return self.archive if self.archive.is_file() else None

    def prepare_data(self) -> None:
        source = self.source()
        if source is None and self.download:
            self._try_download()
            source = self.source()
        if source is None:
            raise DataError(
                f"{self.title} not found and could not be downloaded: put {self.archive.name} (or its extracted "
                f"folder {self.folder.name}/ with {', '.join(self.file_md5s())}) into {self.data_dir}/ "
                f"(or point VITLAB_DATA_DIR / paths.data_dir at a folder that has it)."
            )
        if not self.verify_md5:
            return
        checks = ({self.archive: self.torchvision_class.tgz_md5} if source == self.archive
                  else {self.folder / name: md5 for name, md5 in self.file_md5s().items()})
        for path, md5 in checks.items():
            if not check_integrity(str(path), md5):
                raise DataError(
                    f"{path} does not match the official MD5 {md5}: the file is corrupt or a different version; "
                    f"delete it and download it again (data.verify_md5=false skips the check for files of your own)."
                )

    def _try_download(self) -> None:
        if not writable(self.data_dir):
            return
        tv = self.torchvision_class
        try:
            download_url(tv.url, str(self.data_dir), filename=tv.filename, md5=tv.tgz_md5)
        except Exception:  # noqa: BLE001 - no network: the caller reports what is missing
            self.archive.unlink(missing_ok=True)

    def _read(self, names: list[str]) -> dict[str, dict]:
        """The named files, decoded, from the folder or straight out of the archive."""
        source = self.source()
        if source is None:
            raise DataError(f"{self.title} files are missing from {self.data_dir}; run prepare_data() first.")
        if source == self.folder:
            return {name: load_pickle((self.folder / name).read_bytes(), str(self.folder / name)) for name in names}
        wanted = {f"{self.folder.name}/{name}": name for name in names}
        found = {}
        try:
            with tarfile.open(self.archive, "r:gz") as tar:
                for member in tar:  # one pass through the compressed stream
                    if member.name in wanted and member.isfile():
                        raw = tar.extractfile(member).read()
                        found[wanted[member.name]] = load_pickle(raw, f"{self.archive}:{member.name}")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"{self.archive} is not a readable tar.gz archive ({err}); delete it and download it again.") from err
        missing = [name for name in names if name not in found]
        if missing:
            raise DataError(f"{self.archive} lacks {', '.join(missing)}: it is not the official archive; delete it and download it again.")
        return found

    def _load(self, train: bool) -> InMemoryImages:
        tv = self.torchvision_class
        names = [name for name, _ in (tv.train_list if train else tv.test_list)]
        entries = self._read([*names, tv.meta["filename"]])
        class_names = entries[tv.meta["filename"]].get(tv.meta["key"])
        if isinstance(class_names, list) and len(class_names) == self.num_classes:
            self.class_names = [str(n) for n in class_names]
        images, labels = [], []
        for name in names:
            entry = entries[name]
            data, targets = entry.get("data"), entry.get(self.label_key)
            if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                    and data.shape[1] == 3 * 32 * 32 and isinstance(targets, list) and len(targets) == len(data)):
                raise DataError(f"{name} in {self.data_dir} is not a {self.title} batch (uint8 'data' of shape "
                                f"(N, 3072) and N '{self.label_key}'); delete it and download it again.")
            # Each row holds the red, green and blue 32x32 planes in turn.
            images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
            labels.append(torch.as_tensor(targets, dtype=torch.long))
        labels = torch.cat(labels)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DataError(f"{self.title} labels in {self.data_dir} go outside [0, {self.num_classes - 1}]: "
                            f"check data.num_classes={self.num_classes} or the files.")
        return InMemoryImages(torch.cat(images), labels)


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: the defaults of ``CIFARDataModule``."""


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100 with its 100 fine labels (the 20 coarse superclasses are not used)."""

    torchvision_class = tvd.CIFAR100
    label_key = "fine_labels"
    title = "CIFAR-100"
