import gzip
import os
import shutil

import pytest
import torch

from vitlab.data import FashionMNISTDataModule, MNISTDataModule, SyntheticDataModule, read_idx
from vitlab.errors import DataError

STATS = dict(image_size=28, channels=1, num_classes=10, mean=[0.286], std=[0.353])


def snapshot(path):
    return sorted((p, os.path.getsize(os.path.join(d, p))) for d, _, files in os.walk(path) for p in files)


@pytest.mark.parametrize("cls, name", [(FashionMNISTDataModule, "FashionMNIST"), (MNISTDataModule, "MNIST")])
def test_real_data_read_in_place_without_writing(data_dir, cls, name):
    before = snapshot(data_dir)
    dm = cls(data_dir=str(data_dir), val_size=5000, batch_size=256, **STATS)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    assert dm.train_set.images.dtype == torch.uint8 and dm.train_set.images.shape[1:] == (1, 28, 28)
    assert set(dm.test_set.labels.unique().tolist()) == set(range(10))
    assert snapshot(data_dir) == before, "the data directory must never be written"


def test_split_is_seeded_and_disjoint(data_dir):
    a = FashionMNISTDataModule(data_dir=str(data_dir), split_seed=0, **STATS)
    b = FashionMNISTDataModule(data_dir=str(data_dir), split_seed=0, **STATS)
    c = FashionMNISTDataModule(data_dir=str(data_dir), split_seed=1, **STATS)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert not torch.equal(a.val_set.images, c.val_set.images)
    # No validation image is also a training image (compare by exact pixels on a sample).
    train_keys = {bytes(img.numpy()) for img in a.train_set.images}
    assert sum(bytes(img.numpy()) in train_keys for img in a.val_set.images[:500]) <= 5  # dataset has a few exact duplicates


def test_batches_are_normalised_on_transfer(data_dir):
    dm = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=32, **STATS)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.uint8 and labels.shape == (32,)
    images, labels = dm.on_after_batch_transfer((images, labels), 0)
    assert images.dtype == torch.float32
    assert -1.0 < images.mean().item() < 1.0


def test_statistics_in_config_match_the_data(data_dir):
    dm = FashionMNISTDataModule(data_dir=str(data_dir), val_size=0, **STATS)
    dm.setup("fit")
    pixels = dm.train_set.images.float() / 255
    assert pixels.mean().item() == pytest.approx(0.2860, abs=5e-4)
    assert pixels.std().item() == pytest.approx(0.3530, abs=5e-4)


def test_missing_data_names_folder_and_files(tmp_path):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=False, **STATS)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "train-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert message.count(". ") == 0, "one sentence"


def test_corrupt_file_is_refused_by_checksum(data_dir, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    shutil.copytree(data_dir / "FashionMNIST" / "raw", raw)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 10))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=False, **STATS)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz does not match the official MD5"):
        dm.prepare_data()


def test_read_idx_rejects_truncated_files(tmp_path):
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100))
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(bad)
    (tmp_path / "notgz.gz").write_bytes(b"hello")
    with pytest.raises(DataError, match="not a readable gzip file"):
        read_idx(tmp_path / "notgz.gz")


def test_synthetic_any_shape():
    dm = SyntheticDataModule(image_size=16, channels=3, num_classes=5, train_size=64, val_size=16, test_size=16, batch_size=8)
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 16, 16) and labels.max() < 5
    # Same templates across splits, so what is learnt on train transfers to test.
    assert len(dm.test_set) == 16


def test_crop_flip_shifts_and_flips_each_image_on_its_own():
    from vitlab.data.augment import RandomCropFlip

    torch.manual_seed(0)
    images = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = RandomCropFlip(padding=1, hflip=True)(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    # Every output is the input shifted by at most one pixel, maybe mirrored.
    candidates = []
    padded = torch.nn.functional.pad(images[0], (1, 1, 1, 1))
    for dy in range(3):
        for dx in range(3):
            crop = padded[:, dy:dy + 4, dx:dx + 4]
            candidates += [crop, crop.flip(-1)]
    assert all(any(torch.equal(o, c) for c in candidates) for o in out)
    assert len({bytes(o.numpy()) for o in out}) > 5, "images draw their own shift and flip"
    assert torch.equal(RandomCropFlip()(images), images)


def test_augmentation_only_on_training_batches(data_dir):
    from vitlab.data.augment import RandomCropFlip

    class Trainer:
        training = False

    dm = FashionMNISTDataModule(data_dir=str(data_dir), augment=RandomCropFlip(2, True), **STATS)
    dm.trainer = Trainer()
    batch = (torch.randint(0, 255, (8, 1, 28, 28), dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(dm.on_after_batch_transfer(batch, 0)[0], dm.normalize(batch[0]))
    dm.trainer.training = True
    assert not torch.equal(dm.on_after_batch_transfer(batch, 0)[0], dm.normalize(batch[0]))
