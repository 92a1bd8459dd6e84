"""Sharded datasets (LitData): `python -m vitlab.prepare` writes any dataset as shards with the
images' own bytes; `data=shards` trains from them, locally or from an S3 bucket (a local
S3-compatible server here), shuffled per epoch, each DDP rank and worker reading its own
samples, resuming exactly after a SIGTERM in the middle of an epoch; eval and predict take the
checkpoint."""

import csv
import hashlib
import json
import logging
import os
import signal
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
from litdata import StreamingDataset
from litdata.streaming import downloader
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, run_entry
from imagegen import make_image_folder
from inprocess import assert_short_failure, run_in_process
from vitlab.errors import DataError
from vitlab.data.imagefolder import ImageFolderDataModule
from vitlab.data.shards import META_FILE, ShardsDataModule, shard_classes, write_shards
from vitlab.data.synthetic import make_images
from vitlab.data.transforms import BadImageError, decode
from vitlab.eval import main as eval_main
from vitlab.predict import main as predict_main
from vitlab.prepare import main as prepare_main
from vitlab.train import main as train_main

TESTS = Path(__file__).resolve().parent
TINY = ("data.image_size=16", "model.patch_size=4", "model.dim=32", "model.depth=2", "model.heads=2",
        "model.dim_head=16", "model.mlp_dim=64", "trainer.enable_progress_bar=false", "torch_threads=1")
# Fixed statistics and a crop without randomness: an image seen in training is its sample.
PLAIN = ("data.train_crop=center", "data.hflip=false", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]")


def shards_overrides(root) -> tuple[str, ...]:
    # data.num_classes comes from the shards' vitlab.json (${vitlab.shard_classes:...}).
    return ("data=shards", f"data.root={root}")


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after training step ``step``, as a scheduler would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class SeenSamples(L.Callback):
    """Writes ``<epoch> <sha1 of the uint8 image>`` for every training sample to ``<path>.<rank>``
    (the batches arrive normalised with mean 0.5 and std 0.25)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        pixels = ((batch[0].float() * 0.25 + 0.5) * 255).round().to(torch.uint8)
        with open(f"{self.path}.{trainer.global_rank}", "a") as f:
            f.writelines(f"{trainer.current_epoch} {digest(image)}\n" for image in pixels)


def digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """96 training images of 3 classes, mixed PNG (RGB and grayscale) and JPEG, and 96 each of
    val and test."""
    return make_image_folder(tmp_path_factory.mktemp("photos") / "photos", splits=("train", "val", "test"),
                             per_class=32)


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory):
    """``photos`` as shards of about 4 KB (about 3 images) per chunk."""
    output = tmp_path_factory.mktemp("shards") / "shards"
    folder = ImageFolderDataModule(root=str(photos), image_size=16, in_memory=False)
    write_shards(folder, str(output), num_workers=2, chunk_bytes="4KB")
    return output


def datamodule(root, **kwargs) -> ShardsDataModule:
    kwargs = {"image_size": 16, "batch_size": 8, "num_workers": 0, "mean": [0.5] * 3, "std": [0.25] * 3, **kwargs}
    return ShardsDataModule(root=str(root), **kwargs)


def epoch_digests(loader) -> list[str]:
    return [digest(image) for images, _, _ in loader for image in images]


def test_prepare_stores_the_files_bytes_labels_and_class_names(photos, tmp_path, data_dir, monkeypatch, capsys):
    def prepare(*args):
        return run_in_process(prepare_main, "vitlab.prepare", ["data=imagefolder", f"data.root={photos}", *args],
                              cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)

    out = tmp_path / "out"
    assert prepare(f"output={out}", "chunk_bytes=8KB", "num_workers=2", "name=p").returncode == 0
    meta = json.loads((out / META_FILE).read_text())
    assert meta["classes"] == ["cat", "dog", "owl"] and meta["splits"] == {"train": 96, "val": 96, "test": 96}
    assert "train with: python -m vitlab.train data=shards" in (tmp_path / "outputs/prepare/p/prepare.log").read_text()
    one_process = tmp_path / "one_process"
    assert prepare(f"output={one_process}", "chunk_bytes=8KB", "num_workers=1", "name=p1").returncode == 0
    for split in ("train", "val", "test"):
        stored = StreamingDataset(str(out / split))
        samples = [stored[i] for i in range(len(stored))]
        names = [bytes(s["name"]).decode() for s in samples]
        assert sorted(names) == sorted(str(p.relative_to(photos)) for p in (photos / split).rglob("*.*"))
        for sample, name in zip(samples, names):
            assert bytes(sample["image"]) == (photos / name).read_bytes(), "stored as the file, not re-encoded"
            assert sample["label"] == ["cat", "dog", "owl"].index(Path(name).parent.name)
        # Written in a seeded random order (the classes alternate often, where sorted files would
        # change class twice), the same whatever the number of writing processes.
        labels = [s["label"] for s in samples]
        assert sum(a != b for a, b in zip(labels, labels[1:])) > 30
        written_by_one = StreamingDataset(str(one_process / split))
        assert [bytes(written_by_one[i]["name"]).decode() for i in range(len(written_by_one))] == names
        assert len(list((out / split).glob("chunk-*.bin"))) > 3

    assert_short_failure(prepare(f"output={out}"), f"error: DataError: output={out} already holds shards")
    assert_short_failure(prepare(), "error: ValueError: output is not set")


def test_prepare_writes_in_memory_datasets_as_lossless_png(tmp_path, data_dir, monkeypatch, capsys):
    out = tmp_path / "synthetic"
    sizes = ("data.train_size=40", "data.val_size=10", "data.test_size=10", "data.image_size=8",
             "data.num_classes=4")
    result = run_in_process(prepare_main, "vitlab.prepare", ["data=synthetic", *sizes, f"output={out}",
                            "num_workers=1"], cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0
    meta = json.loads((out / META_FILE).read_text())
    assert meta["splits"] == {"train": 40, "val": 10, "test": 10} and meta["encoding"] == "png"
    source = make_images(40, 8, 3, 4, seed=0)
    dataset = StreamingDataset(str(out / "train"))
    for i in range(len(dataset)):
        sample = dataset[i]
        index = int(bytes(sample["name"]).decode().split("/")[1])
        assert bytes(sample["image"])[:8] == b"\x89PNG\r\n\x1a\n"
        assert torch.equal(decode(sample["image"], 3), source.images[index]), "PNG is lossless"
        assert sample["label"] == int(source.labels[index])


def test_layout_errors_name_the_path_before_training(shards, tmp_path, data_dir, monkeypatch, capsys):
    def expect(fragment, root):
        with pytest.raises(DataError) as info:
            datamodule(root)
        assert fragment in str(info.value) and "\n" not in str(info.value)

    expect(f"data.root={tmp_path / 'none'} does not exist", tmp_path / "none")
    (tmp_path / "empty").mkdir()
    expect(f"data.root={tmp_path / 'empty'} has no {META_FILE}", tmp_path / "empty")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / META_FILE).write_text((shards / META_FILE).read_text())
    expect(f"data.root={copy} has no shards for its train split ({copy / 'train' / 'index.json'} is missing)", copy)
    with pytest.raises(DataError, match="data=shards needs data.root="):
        ShardsDataModule(root=None, image_size=16)
    with pytest.raises(ValueError, match=f"data.num_classes=5 but {shards / META_FILE} lists 3 classes"):
        datamodule(shards, num_classes=5)

    result = run_in_process(train_main, "vitlab.train", [*shards_overrides(tmp_path / "empty"), *TINY],
                            cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert_short_failure(result, f"error: DataError: data.root={tmp_path / 'empty'} has no {META_FILE}")


def test_shard_classes_resolver_reads_vitlab_json(shards, tmp_path):
    assert shard_classes(str(shards)) == 3
    assert shard_classes(str(tmp_path)) is None and shard_classes(None) is None
    if not OmegaConf.has_resolver("vitlab.shard_classes"):  # until vitlab.config registers it
        OmegaConf.register_new_resolver("vitlab.shard_classes", shard_classes, use_cache=True)
    data = OmegaConf.load(CONFIG_DIR / "data" / "shards.yaml")
    cfg = OmegaConf.create({"seed": 0, "data": {**OmegaConf.to_container(data), "root": str(shards)}})
    assert cfg.data.num_classes == 3


def test_epochs_are_shuffled_from_the_seed_and_each_worker_reads_its_own_samples(shards):
    reference = datamodule(shards, train_crop="center", hflip=False)
    reference.setup("fit")
    everything = sorted(digest(reference.train_set[i][0]) for i in range(96))
    assert len(set(everything)) == 96
    orders = {}
    for seed in (0, 0, 1):
        dm = datamodule(shards, train_crop="center", hflip=False, num_workers=2, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        epochs = [epoch_digests(loader) for _ in range(2)]
        for seen in epochs:
            assert sorted(seen) == everything, "every sample once per epoch, across 2 workers"
        assert epochs[0] != epochs[1], "reshuffled each epoch"
        orders.setdefault(seed, []).append(epochs)
    assert orders[0][0] == orders[0][1], "the order is a function of the seed"
    assert orders[0][0][0] != orders[1][0][0]
    # Evaluation: every sample once, in batches that do not divide the split, across workers.
    dm = datamodule(shards, num_workers=2, eval_batch_size=5)
    dm.setup("validate")
    val = [digest(dm.val_set[i][0]) for i in range(96)]
    loader = dm.val_dataloader()
    assert len(loader) == 20 and sorted(epoch_digests(loader)) == sorted(val), "none left out, none twice"


def test_bad_sample_stops_naming_its_file_or_is_replaced(tmp_path, caplog):
    root = make_image_folder(tmp_path / "photos", per_class=4)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    write_shards(ImageFolderDataModule(root=str(root), image_size=16, in_memory=False), str(tmp_path / "shards"),
                 num_workers=1, chunk_bytes="4KB")
    strict = datamodule(tmp_path / "shards", batch_size=13)
    strict.setup("fit")
    with pytest.raises(BadImageError, match=r"train/dog/broken.jpg \(shards .*shards/train\) cannot be read"):
        list(strict.train_dataloader())

    runs = []
    for _ in range(2):
        lenient = datamodule(tmp_path / "shards", batch_size=13, on_bad_file="skip")
        lenient.setup("fit")
        batches = list(lenient.train_dataloader())
        assert sum(len(labels) for _, labels, _ in batches) == 13, "the bad sample is replaced, not dropped"
        skipped = [name for *_, names in batches for name in names]
        assert len(skipped) == 1 and skipped[0].startswith("train/dog/broken.jpg")
        with caplog.at_level(logging.WARNING):
            lenient.note_skipped(skipped)
        assert list(lenient.skipped_files.values()) == skipped
        runs.append(torch.cat([images for images, _, _ in batches]))
    assert "skipped an unreadable file (data.on_bad_file=skip): train/dog/broken.jpg" in caplog.text
    assert torch.equal(runs[0], runs[1]), "the replacement is drawn from the sample's seed"


def test_sigterm_mid_epoch_resumes_to_the_same_result(shards, tmp_path, data_dir):
    """trainer.deterministic=true, 2 loader workers, RandAugment on the device: a run stopped by
    SIGTERM in the middle of epoch 2 and re-run ends with the test metrics and weights of an
    uninterrupted run (the loader continues where it was; Lightning alone would start the
    epoch again, see ShardsDataModule.state_dict)."""
    overrides = [*shards_overrides(shards), *TINY, "data.batch_size=8", "data.num_workers=2", "augment=randaugment",
                 "trainer.max_epochs=2", "trainer.deterministic=true", "trainer.limit_val_batches=1",
                 "callbacks.model_checkpoint.monitor=null", "logger=csv"]
    env = {"PYTHONPATH": str(TESTS)}
    run_entry("vitlab.train", *overrides, "name=whole", cwd=tmp_path, data_dir=data_dir)
    stop = ["+callbacks.stop._target_=test_shards.SigtermAt", "+callbacks.stop.step=17"]  # epoch 2 of 12-step epochs
    stopped = run_entry("vitlab.train", *overrides, *stop, "name=cut", cwd=tmp_path, data_dir=data_dir, env=env,
                        check=False)
    assert stopped.returncode == 143 and "interrupted by SIGTERM" in stopped.stderr, stopped.stderr[-2000:]
    runs = tmp_path / "outputs" / "runs"
    saved = torch.load(runs / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 17
    assert saved["ShardsDataModule"]["train_loader"]["num_samples_yielded"] == 5 * 8
    run_entry("vitlab.train", *overrides, "name=cut", cwd=tmp_path, data_dir=data_dir)
    whole, cut = (json.loads((runs / name / "metrics.json").read_text()) for name in ("whole", "cut"))
    assert cut["status"] == "completed" and cut["global_step"] == whole["global_step"] == 24
    assert (cut["test/acc"], cut["test/loss"]) == (whole["test/acc"], whole["test/loss"])
    final = {name: torch.load(runs / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
             for name in ("whole", "cut")}
    assert all(torch.equal(final["whole"][k], final["cut"][k]) for k in final["whole"])


def test_ddp_ranks_and_workers_read_each_sample_once_and_eval_predict_take_the_checkpoint(
        photos, shards, tmp_path, data_dir, monkeypatch, capsys):
    """trainer=ddp with 2 CPU processes of 2 loader workers each: in every epoch the samples
    trained on are the dataset, no duplicates, none missing (96 = 2 ranks x 6 batches of 8).
    Evaluation in batches of 20: 2 batches on rank 0, 3 on rank 1 (the remainder)."""
    seen = tmp_path / "seen"
    run_entry("vitlab.train", *shards_overrides(shards), *TINY, *PLAIN, "trainer=ddp", "trainer.devices=2",
              "data.batch_size=8", "data.eval_batch_size=20", "data.num_workers=2", "trainer.max_epochs=2",
              "callbacks.model_checkpoint.monitor=null",
              "+callbacks.seen._target_=test_shards.SeenSamples", f"+callbacks.seen.path={seen}", "name=ddp",
              cwd=tmp_path, data_dir=data_dir, env={"PYTHONPATH": str(TESTS)})
    reference = datamodule(shards, train_crop="center", hflip=False)
    reference.setup("fit")
    everything = sorted(digest(reference.train_set[i][0]) for i in range(96))
    ranks = [[line.split() for line in Path(f"{seen}.{rank}").read_text().splitlines()] for rank in (0, 1)]
    for epoch in ("0", "1"):
        shares = [[h for e, h in lines if e == epoch] for lines in ranks]
        assert len(shares[0]) == len(shares[1]) == 48
        assert sorted(shares[0] + shares[1]) == everything, f"epoch {epoch}: each sample once across the ranks"
    assert [h for e, h in ranks[0] if e == "0"] != [h for e, h in ranks[0] if e == "1"]

    ckpt = tmp_path / "outputs" / "runs" / "ddp" / "checkpoints" / "last.ckpt"
    assert run_in_process(eval_main, "vitlab.eval", [f"ckpt_path={ckpt}", "name=ddp"], cwd=tmp_path,
                          data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys).returncode == 0
    out = tmp_path / "outputs" / "eval" / "ddp"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["test_split_size"] == 96, "the shards' test split"
    matrix = list(csv.reader(open(out / "confusion_matrix.csv")))
    assert [row[0] for row in matrix[1:]] == ["cat", "dog", "owl"]
    correct = {row[0]: int(row[1 + i]) for i, row in enumerate(matrix[1:])}

    assert run_in_process(predict_main, "vitlab.predict", [f"ckpt_path={ckpt}", f"input={photos / 'test'}",
                          "name=ddp"], cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch,
                          capsys=capsys).returncode == 0
    rows = list(csv.DictReader(open(tmp_path / "outputs" / "predict" / "ddp" / "predictions.csv")))
    assert len(rows) == 96
    for name in ("cat", "dog", "owl"):
        right = sum(row["class"] == name == Path(row["file"]).parent.name for row in rows)
        assert right == correct[name], "predict on the test files agrees with eval on their shards"


@pytest.fixture
def s3_server(monkeypatch):
    """A local S3-compatible server (moto) on 127.0.0.1, with the AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)
    # vitlab.data.shards.use_sdk_for_plain_http changes this for an http:// endpoint: undone after.
    monkeypatch.setattr(downloader, "_OBSTORE_INIT_PID", downloader._OBSTORE_INIT_PID)
    import boto3

    boto3.client("s3").create_bucket(Bucket="vitlab")
    yield endpoint
    server.stop()


def test_s3_bucket_on_a_local_server(photos, s3_server, tmp_path, data_dir, monkeypatch, capsys):
    result = run_in_process(prepare_main, "vitlab.prepare", ["data=imagefolder", f"data.root={photos}",
                            "output=s3://vitlab/photos", "chunk_bytes=16KB", "num_workers=2"], cwd=tmp_path,
                            data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert shard_classes("s3://vitlab/photos") == 3
    assert not downloader.obstore_usable(), "http:// endpoint: LitData's boto3 transfers (see use_sdk_for_plain_http)"

    # The endpoint given as LitData's storage_options instead of AWS_ENDPOINT_URL.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    common = ["data=shards", "data.root=s3://vitlab/photos", "data.num_classes=3",
              f"data.storage_options={{endpoint_url:'{s3_server}'}}", f"data.cache_dir={tmp_path / 'cache'}",
              *TINY, "data.batch_size=16", "data.num_workers=2", "trainer.max_epochs=1", "logger=csv"]
    result = run_in_process(train_main, "vitlab.train", [*common, "name=s3"], cwd=tmp_path, data_dir=data_dir,
                            monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "outputs" / "runs" / "s3" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 6 and "test/acc" in metrics

    missing = [*common[:1], "data.root=s3://vitlab/nothing", *common[2:]]
    assert_short_failure(run_in_process(train_main, "vitlab.train", [*missing, "name=missing"], cwd=tmp_path,
                                        data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys),
                         f"error: DataError: data.root=s3://vitlab/nothing has no {META_FILE}")
