"""data=imagefolder: the layout is checked with messages that name the folder or file, images
of any size and mode become uint8 tensors of the configured shape, and class names are kept."""

import logging
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from imagegen import make_image_folder, write_image
from vitlab.config import class_folders
from vitlab.errors import DataError
from vitlab.data.imagefolder import ImageFolderDataModule, list_images, load_image, pixel_statistics


def datamodule(root, **kwargs):
    kwargs = {"image_size": 16, "channels": 3, "batch_size": 8, **kwargs}
    return ImageFolderDataModule(root=str(root), **kwargs)


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "photos", per_class=3)


@pytest.mark.parametrize("channels", [3, 1])
def test_splits_decoded_to_the_configured_shape_with_class_names(folder, channels, caplog):
    dm = datamodule(folder, channels=channels)
    assert dm.class_names == ["cat", "dog", "owl"] and dm.num_classes == 3
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
        dm.setup("test")
    assert dm.train_set.images.shape == (9, channels, 16, 16) and dm.train_set.images.dtype == torch.uint8
    assert dm.train_set.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # No test/ folder: the test split is val/, and the log says so.
    assert dm.test_set is dm.val_set
    assert "has no test/ folder: the test split is val/" in caplog.text
    # Statistics computed on the training images, used to normalise batches.
    mean, std = pixel_statistics(dm.train_set.images)
    assert torch.allclose(dm.mean.flatten(), torch.tensor(mean)) and dm.mean.numel() == channels
    images, labels = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert images.dtype == torch.float32 and images.shape[1:] == (channels, 16, 16)


def test_test_folder_and_configured_statistics(tmp_path):
    root = make_image_folder(tmp_path / "p", splits=("train", "val", "test"), per_class=2)
    dm = datamodule(root, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    dm.setup("test")
    assert len(dm.test_set) == 6 and dm.train_set is None, "testing decodes only test/ when statistics are given"
    assert dm.mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_number_of_classes_comes_from_the_folders(folder):
    cfg = OmegaConf.create({"data": {"root": str(folder), "num_classes": "${vitlab.class_folders:${data.root}}"}})
    assert cfg.data.num_classes == 3
    assert class_folders(str(folder / "missing")) is None and class_folders(None) is None


def test_any_size_and_mode_is_converted(tmp_path):
    wide = write_image(tmp_path / "wide.jpg", (10, 200, 30), 30, 90, seed=0)
    gray = write_image(tmp_path / "gray.png", (10, 200, 30), 50, 20, seed=1, mode="L")
    for path in (wide, gray):
        assert load_image(path, 3, 24).shape == (3, 24, 24)
        assert load_image(path, 1, 24).shape == (1, 24, 24)
        assert load_image(path, 3, 24, resize="stretch").shape == (3, 24, 24)
    # A 16-bit grayscale PNG and a BMP (read through Pillow) are 8-bit tensors too.
    import numpy as np
    from PIL import Image

    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(tmp_path / "deep.png")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "old.bmp")
    assert load_image(tmp_path / "deep.png", 1, 8).dtype == torch.uint8
    bmp = load_image(tmp_path / "old.bmp", 3, 8)
    assert bmp.dtype == torch.uint8 and bmp[:, 4, 4].tolist() == [200, 10, 10]


def expect(error_type, fragment, make):
    with pytest.raises(error_type) as info:
        make()
    assert fragment in str(info.value), str(info.value)
    return str(info.value)


def test_root_missing_or_unset(tmp_path):
    expect(DataError, f"data.root={tmp_path / 'nope'} does not exist", lambda: datamodule(tmp_path / "nope"))
    expect(DataError, "data=imagefolder needs data.root=<dir>", lambda: ImageFolderDataModule(root=None, image_size=16))


def test_missing_val_split(folder):
    shutil.rmtree(folder / "val")
    expect(DataError, f"data.root={folder} has no val/ folder", lambda: datamodule(folder))


def test_empty_class_folder_is_named(folder):
    for image in (folder / "train" / "dog").iterdir():
        image.unlink()
    (folder / "train" / "dog" / "notes.txt").write_text("not an image")
    expect(DataError, f"{folder / 'train' / 'dog'} holds no images", lambda: datamodule(folder))


def test_class_folders_must_match_between_splits(folder):
    (folder / "val" / "owl").rename(folder / "val" / "owls")
    message = expect(DataError, f"the class folders of {folder / 'val'} differ from those of train/",
                     lambda: datamodule(folder))
    assert "missing ['owl']" in message and "not in train/ ['owls']" in message


def test_unreadable_image_is_named_before_training(folder):
    broken = folder / "train" / "cat" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    dm = datamodule(folder)
    expect(DataError, f"{broken} cannot be read as an image", lambda: dm.setup("fit"))


def test_wrong_class_count_or_channels(folder):
    expect(ValueError, "data.num_classes=5 but", lambda: datamodule(folder, num_classes=5))
    expect(ValueError, "data.channels=4", lambda: datamodule(folder, channels=4))


def test_predict_inputs(tmp_path, folder):
    expect(FileNotFoundError, f"input={tmp_path / 'none'} does not exist", lambda: list_images(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    expect(DataError, f"input={tmp_path / 'empty'} holds no images", lambda: list_images(tmp_path / "empty"))
    assert len(list_images(folder)) == 18, "a folder is searched recursively"
