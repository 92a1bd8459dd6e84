"""CIFAR-10/100 loaders on small files written in the official format by the tests.

The official "python version" files are Python 2 pickles of dicts: byte-string keys, a uint8
numpy array ``data`` of shape (N, 3072) (red, green, blue 32x32 planes), label lists, and a
meta file with the class names. ``write_py2_pickle`` reproduces that encoding, including the
numpy 1 module path of the array reconstructor.
"""

import io
import os
import pickle
import stat
import struct
import tarfile

import numpy as np
import pytest
import torch

from conftest import SLICE, run_entry
from vitlab.data import CIFAR10DataModule, CIFAR100DataModule
from vitlab.errors import DataError
from vitlab.data.cifar import load_pickle


class Py2Pickler(pickle._Pickler):
    """Protocol 2 with every string written as a Python 2 ``str`` (as cPickle wrote them)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1 (which wrote the official files) named the array reconstructor numpy.core.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def images_for(labels, seed):
    """Rows of (N, 3072) uint8: per image, red = 10 * label, green = index, blue = noise."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    red = np.repeat((10 * np.asarray(labels, dtype=np.uint8))[:, None], 1024, axis=1)
    green = np.repeat((np.arange(n) % 256).astype(np.uint8)[:, None], 1024, axis=1)
    blue = rng.integers(0, 256, (n, 1024), dtype=np.uint8)
    return np.concatenate([red, green, blue], axis=1)


def official_files(name: str, per_batch: int = 24, n_test: int = 40) -> dict[str, bytes]:
    """Files of the official CIFAR-10 or CIFAR-100 python version, small."""
    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    files = {}
    if name == "cifar10":
        for i in range(1, 6):
            labels = rng.integers(0, classes, per_batch).tolist()
            files[f"data_batch_{i}"] = {"batch_label": f"training batch {i} of 5", "labels": labels,
                                        "data": images_for(labels, i),
                                        "filenames": [f"img_{i}_{k}.png" for k in range(per_batch)]}
        labels = rng.integers(0, classes, n_test).tolist()
        files["test_batch"] = {"batch_label": "testing batch 1 of 1", "labels": labels, "data": images_for(labels, 9),
                               "filenames": [f"test_{k}.png" for k in range(n_test)]}
        files["batches.meta"] = {"num_cases_per_batch": per_batch, "num_vis": 3072,
                                 "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                 "horse", "ship", "truck"]}
    else:
        for split, n, seed in (("train", 5 * per_batch, 1), ("test", n_test, 9)):
            fine = rng.integers(0, classes, n).tolist()
            files[split] = {"batch_label": f"{split}ing batch 1 of 1", "fine_labels": fine,
                            "coarse_labels": [f // 5 for f in fine], "data": images_for(fine, seed),
                            "filenames": [f"{split}_{k}.png" for k in range(n)]}
        files["meta"] = {"fine_label_names": [f"class_{k}" for k in range(classes)],
                         "coarse_label_names": [f"super_{k}" for k in range(20)]}
    return {key: py2_pickle(value) for key, value in files.items()}


FOLDERS = {"cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", CIFAR10DataModule),
           "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", CIFAR100DataModule)}


def write_folder(root, name):
    folder = root / FOLDERS[name][0]
    folder.mkdir(parents=True)
    for file, raw in official_files(name).items():
        (folder / file).write_bytes(raw)
    return root


def write_archive(root, name):
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / FOLDERS[name][1], "w:gz") as tar:
        for file, raw in official_files(name).items():
            info = tarfile.TarInfo(f"{FOLDERS[name][0]}/{file}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return root


def datamodule(name, root, **kwargs):
    cls = FOLDERS[name][2]
    stats = dict(image_size=32, channels=3, num_classes=10 if name == "cifar10" else 100, mean=[0.5] * 3,
                 std=[0.25] * 3, val_size=20, batch_size=16)
    return cls(data_dir=str(root), **{**stats, "verify_md5": False, **kwargs})


def snapshot(path):
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_folder_and_archive_give_the_same_data_and_nothing_is_written(tmp_path, name):
    sets = []
    for root in (write_folder(tmp_path / "folder", name), write_archive(tmp_path / "archive", name)):
        before = snapshot(root)
        root.chmod(stat.S_IRUSR | stat.S_IXUSR)  # read-only, as shared storage
        try:
            dm = datamodule(name, root)
            dm.prepare_data()
            dm.setup("fit")
            dm.setup("test")
        finally:
            root.chmod(stat.S_IRWXU)
        assert snapshot(root) == before, "the data directory must never be written"
        sets.append(dm)
    folder, archive = sets
    for split in ("train_set", "val_set", "test_set"):
        assert torch.equal(getattr(folder, split).images, getattr(archive, split).images)
        assert torch.equal(getattr(folder, split).labels, getattr(archive, split).labels)
    dm = folder
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (100, 20, 40)
    assert dm.train_set.images.dtype == torch.uint8 and dm.train_set.images.shape[1:] == (3, 32, 32)
    # Planes decoded in order: red encodes the label (10 * label), green the index in its file.
    images, labels = dm.test_set.images, dm.test_set.labels
    assert torch.equal(images[:, 0, 5, 7].long(), (10 * labels) % 256)
    assert torch.equal(images[:, 1, 0, 0].long(), torch.arange(40))
    assert dm.class_names[:2] == (["airplane", "automobile"] if name == "cifar10" else ["class_0", "class_1"])


def test_labels_of_cifar100_are_the_fine_labels(tmp_path):
    dm = datamodule("cifar100", write_folder(tmp_path, "cifar100"))
    dm.setup("test")
    assert dm.test_set.labels.max() >= 20, "fine labels (100 classes), not the 20 coarse ones"


def test_md5_of_the_official_files_is_checked(tmp_path):
    write_folder(tmp_path / "folder", "cifar10")
    write_archive(tmp_path / "archive", "cifar10")
    with pytest.raises(DataError, match=r"data_batch_1 does not match the official MD5 c99cafc1"):
        datamodule("cifar10", tmp_path / "folder", verify_md5=True).prepare_data()
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz does not match the official MD5 c58f3010"):
        datamodule("cifar10", tmp_path / "archive", verify_md5=True).prepare_data()


def test_missing_data_names_folder_and_files(tmp_path):
    with pytest.raises(DataError) as info:
        datamodule("cifar10", tmp_path, download=False).prepare_data()
    message = str(info.value)
    assert str(tmp_path) in message and "cifar-10-python.tar.gz" in message
    assert "cifar-10-batches-py/" in message and "data_batch_5" in message and "batches.meta" in message
    assert message.count(". ") == 0, "one sentence"


class Payload:
    """Unpickling this runs a shell command: what a tampered data file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvalPayload:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("payload", ["system", "eval", "numpy_load"])
def test_pickles_with_code_are_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    if payload == "system":
        obj = {"data": Payload(marker), "labels": [0]}
    elif payload == "eval":
        obj = {"data": EvalPayload(), "labels": [0]}
    else:  # a numpy global other than the array reconstructor
        obj = {"data": np.load, "labels": [0]}
    raw = pickle.dumps(obj, protocol=2)
    with pytest.raises(DataError, match="is not allowed in a CIFAR file"):
        load_pickle(raw, "data_batch_1")
    # The same payload inside an otherwise valid folder stops the datamodule before training.
    write_folder(tmp_path / "data", "cifar10")
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3").write_bytes(raw)
    dm = datamodule("cifar10", tmp_path / "data")
    with pytest.raises(DataError, match=r"data_batch_3 is not a valid CIFAR file .*not allowed"):
        dm.setup("fit")
    assert not marker.exists(), "the payload must not have run"


def test_a_valid_pickle_of_the_wrong_content_is_refused(tmp_path):
    write_folder(tmp_path, "cifar10")
    bad = {"data": np.zeros((3, 3072), dtype=np.float32), "labels": [0, 1, 2]}
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(py2_pickle(bad))
    with pytest.raises(DataError, match="data_batch_2 .* is not a CIFAR-10 batch"):
        datamodule("cifar10", tmp_path).setup("fit")


@pytest.mark.parametrize("name, layout", [("cifar10", write_folder), ("cifar100", write_archive)])
def test_train_a_few_steps_on_cifar(tmp_path, name, layout):
    data = layout(tmp_path / "data", name)
    result = run_entry(
        "vitlab.train", f"data={name}", "data.verify_md5=false", "data.val_size=20", *SLICE, "data.batch_size=16",
        "data.eval_batch_size=16", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "torch_threads=1",
        "logger=csv", "name=cifar", cwd=tmp_path, data_dir=data,
    )
    assert "test/acc" in result.stdout
    metrics = (tmp_path / "outputs" / "runs" / "cifar" / "metrics.json").read_text()
    assert '"status": "completed"' in metrics
