"""Datasets read per sample: the in-memory/streaming choice, per-image transforms, the resumable
training sampler, bad files, and exact resume after SIGTERM in the middle of an epoch (in
memory and streaming)."""

import json
import logging
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import SLICE, run_entry
from imagegen import make_image_folder, write_image
from test_checkpoint import last_logged_step
from vitlab.data.imagefolder import ImageFileDataset, ImageFolderDataModule
from vitlab.data.loading import EpochSampler, ResumePoint, collate_samples, read_sample, sample_seed
from vitlab.data.transforms import BadImageError, SampleTransform, decode, inception_box


def datamodule(root, **kwargs):
    kwargs = {"image_size": 16, "channels": 3, "batch_size": 4, "num_workers": 0, **kwargs}
    return ImageFolderDataModule(root=str(root), **kwargs)


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "photos", per_class=4)


def test_auto_streams_when_the_decoded_splits_exceed_the_budget(folder, caplog):
    # 24 images of 3x16x16 = 18 KiB decoded.
    with caplog.at_level(logging.INFO):
        small = datamodule(folder, memory_budget_gb=1.0)
        big = datamodule(folder, memory_budget_gb=1e-6)
    assert not small.streaming and big.streaming
    assert "decoded into memory (data.in_memory=auto: 24 images, 0.00 GiB decoded at 3x16x16, budget 1.00 GiB)" \
        in caplog.text
    assert "streaming from disk (data.in_memory=auto" in caplog.text
    assert datamodule(folder, in_memory=False).streaming and not datamodule(folder, in_memory=True).streaming
    assert big.num_workers == 0 and datamodule(folder, in_memory=False, num_workers=None).num_workers >= 1
    with pytest.raises(ValueError, match="data.in_memory=maybe is not one of auto, true, false"):
        datamodule(folder, in_memory="maybe")
    with pytest.raises(ValueError, match=r"data.scale=\[0.5, 0.1\] must be"):
        datamodule(folder, in_memory=False, scale=[0.5, 0.1])


def test_transforms_give_the_configured_shape_and_are_functions_of_the_seed(tmp_path):
    image = decode(write_image(tmp_path / "a.jpg", (200, 30, 30), 50, 90, seed=0).read_bytes(), 3)
    assert image.shape == (3, 50, 90) and image.dtype == torch.uint8
    train = SampleTransform(24, train=True, scale=(0.08, 1.0))
    center = SampleTransform(24, train=True, train_crop="center", hflip=False)
    evaluation = SampleTransform(24, train=False, crop_pct=0.875)
    for transform in (train, center, evaluation):
        out = transform(image, 7)
        assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    state = torch.get_rng_state()
    assert torch.equal(train(image, 1), train(image, 1)), "the same seed crops the same way"
    assert not all(torch.equal(train(image, 1), train(image, s)) for s in range(2, 6))
    assert torch.equal(torch.get_rng_state(), state), "per-sample seeding leaves the process's generator alone"
    # Evaluation: the shorter side to 24 / 0.875 = 27, the centre 24 square: no randomness.
    assert torch.equal(evaluation(image, 1), evaluation(image, 2))
    gray = decode((tmp_path / "a.jpg").read_bytes(), 1)
    assert gray.shape == (1, 50, 90)
    # The Inception crop's boxes lie inside the image, with area and aspect in range.
    rng = random.Random(0)
    for _ in range(500):
        top, left, h, w = inception_box(300, 400, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        assert 0.08 - 0.01 <= h * w / 120_000 <= 1.0 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    assert inception_box(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (0, 493, 10, 13), "fallback: centred"


def test_streaming_batches_are_the_same_with_any_number_of_workers(folder):
    batches = {}
    for workers in (0, 2):
        dm = datamodule(folder, in_memory=False, num_workers=workers, mean=[0.5] * 3, std=[0.25] * 3)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        batches[workers] = [(images, labels) for images, labels, _ in loader]
        assert isinstance(dm.train_set, ImageFileDataset)
        images, labels = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16)
    assert len(batches[0]) == 3 and batches[0][0][0].shape == (4, 3, 16, 16)
    for (a, la), (b, lb) in zip(batches[0], batches[2]):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_streamed_statistics_come_from_the_training_images(folder):
    dm = datamodule(folder, in_memory=False)
    dm.setup("fit")
    assert dm.mean.numel() == 3 and 0 < dm.mean.min() < dm.mean.max() < 1


def test_epoch_sampler_order_state_and_ddp_shares():
    data = list(range(10))
    sampler = EpochSampler(data, seed=3)
    sampler.set_epoch(2)
    whole = list(sampler)
    assert sorted(i for i, _ in whole) == data and whole[0][1] == sample_seed(3, 2, whole[0][0])
    again = EpochSampler(data, seed=3)
    again.set_epoch(2)
    assert list(again) == whole, "the order is a function of seed and epoch"
    again.set_epoch(3)
    assert list(again) != whole
    # Stopped after 2 batches of 2 in epoch 2: the first iteration after the restore continues
    # with the 5th index, later epochs start at their beginning.
    point = ResumePoint()
    for epoch in (0, 2, 2):
        point.took_batch(epoch)
    restored = ResumePoint()
    restored.load_state_dict(point.state_dict())
    resumed = EpochSampler(data, seed=3, resume=restored, batch_size=2)
    resumed.set_epoch(2)
    assert list(resumed) == whole[4:] and list(resumed) == whole
    # Two DDP ranks: disjoint shares that together are the dataset.
    shares = []
    for rank in (0, 1):
        s = EpochSampler(data, seed=3, num_replicas=2, rank=rank)
        s.set_epoch(2)
        shares.append([i for i, _ in s])
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == data


def test_bad_file_policy_in_a_streamed_dataset(folder):
    broken = folder / "train" / "cat" / "9.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    files = [(broken, 0), (folder / "train" / "dog" / "0.png", 1)]
    dataset = ImageFileDataset(files, 3, SampleTransform(16, train=False), on_bad_file="error")
    with pytest.raises(BadImageError, match=f"{broken} cannot be read as an image"):
        dataset[(0, 5)]
    dataset.on_bad_file = "skip"
    image, label, skipped = dataset[(0, 5)]
    assert skipped == [0] and label == 1 and image.shape == (3, 16, 16)
    assert dataset[(0, 5)][2] == [0] and torch.equal(dataset[(0, 5)][0], image), "the replacement is seeded"
    assert collate_samples([dataset[(0, 5)], dataset[1]])[2] == [0]
    with pytest.raises(BadImageError, match="files in a row could not be read"):
        read_sample(lambda i, s: (_ for _ in ()).throw(BadImageError("x")), (0, 1), 2, "skip")


def test_bad_file_stops_or_is_skipped_in_a_run(folder, tmp_path, data_dir):
    broken = folder / "train" / "dog" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    common = ["data=imagefolder", f"data.root={folder}", "data.image_size=16", "data.in_memory=false",
              "data.num_workers=0", "data.batch_size=5", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
              "model.dim=32", "model.depth=1", "model.heads=2", "model.dim_head=16", "model.mlp_dim=64",
              "model.patch_size=4", "logger=csv", "torch_threads=1"]
    failed = run_entry("vitlab.train", *common, "name=strict", cwd=tmp_path, data_dir=data_dir, check=False)
    assert failed.returncode == 1 and f"error: BadImageError: {broken} cannot be read as an image" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert json.loads((tmp_path / "outputs/runs/strict/metrics.json").read_text())["status"] == "failed"
    run_entry("vitlab.train", *common, "data.on_bad_file=skip", "name=lenient", cwd=tmp_path, data_dir=data_dir)
    metrics = json.loads((tmp_path / "outputs/runs/lenient/metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["data_streaming"] is True
    assert metrics["skipped_files"] == 1 and metrics["skipped_file_names"] == [str(broken)]


def interrupted_and_whole(tmp_path, data_dir, overrides, steps, cut_at, signals):
    """Run uninterrupted, and again for each signal: stopped by it after ``cut_at`` logged steps
    and re-run. SIGTERM saves where it stopped; after SIGKILL the re-run starts from the last
    end-of-epoch checkpoint. The runs' metrics.json and final weights, by run name."""
    runs = tmp_path / "outputs" / "runs"
    run_entry("vitlab.train", *overrides, "name=whole", cwd=tmp_path, data_dir=data_dir)
    env = {**__import__("os").environ, "VITLAB_DATA_DIR": str(data_dir)}
    for sig in signals:
        run = runs / sig.name
        proc = subprocess.Popen([sys.executable, "-m", "vitlab.train", *overrides, f"name={sig.name}"], cwd=tmp_path,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while last_logged_step(run / "csv" / "metrics.csv") < cut_at and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(sig)
        assert proc.wait() == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
        saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        if sig == signal.SIGTERM:
            assert steps < saved["global_step"] < 2 * steps, f"stopped in the middle of epoch 2 ({saved['global_step']})"
            assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
        else:
            assert saved["global_step"] == steps and last_logged_step(run / "csv" / "metrics.csv") > steps
        run_entry("vitlab.train", *overrides, f"name={sig.name}", cwd=tmp_path, data_dir=data_dir)
    names = ["whole", *(sig.name for sig in signals)]
    metrics = {name: json.loads((runs / name / "metrics.json").read_text()) for name in names}
    weights = {name: torch.load(runs / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
               for name in names}
    return metrics, weights


RESUME = ["trainer.max_epochs=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=2",
          "trainer.deterministic=true", "torch_threads=1", "callbacks.model_checkpoint.monitor=null", "logger=csv",
          "+logger.csv.flush_logs_every_n_steps=1", "trainer.enable_progress_bar=false"]


#: Every design-space switch at once, those with random draws among them: patch dropout (torch's
#: generator, which checkpoints carry) and FlexiViT's patch size per step (seeded by the step).
SWITCHES = ["model.patch_dropout=0.5", "model.patch_norm=false", "model.flexi_patch_sizes=[4,7,14]",
            "model.pos_emb=sincos2d+rope2d_mixed", "model.reg_tokens=2", "model.qk_norm=true", "model.layer_scale=0.1",
            "model.mlp=swiglu", "model.pool=map"]


@pytest.mark.parametrize("path", ["in_memory", "streaming", "switches"])
def test_stopped_mid_epoch_resumes_to_the_same_result(path, tmp_path, data_dir):
    """trainer.deterministic=true: stopped by SIGTERM (and, streamed or with the design-space
    switches, killed) in the middle of epoch 2 and re-run, a run ends with the test metrics and
    weights of an uninterrupted one: the resumed epoch draws the batches (and augmentations,
    dropped patches, patch sizes) the uninterrupted epoch drew after that step. (SIGKILL of an
    in-memory run: tests/test_checkpoint.py.)"""
    if path in ("in_memory", "switches"):
        steps, signals = 40, [signal.SIGTERM] + [signal.SIGKILL] * (path == "switches")
        overrides = [*SLICE, *RESUME, f"trainer.limit_train_batches={steps}", "data.batch_size=32"]
        if path == "switches":
            overrides += [*SWITCHES, "model.dim=32", "model.depth=2", "model.heads=2", "model.dim_head=16",
                          "model.mlp_dim=64"]
    else:
        root = make_image_folder(tmp_path / "photos", per_class=40)
        steps, signals = 30, [signal.SIGTERM, signal.SIGKILL]  # 120 training images in batches of 4
        overrides = [*RESUME, "data=imagefolder", f"data.root={root}", "data.image_size=16", "data.in_memory=false",
                     "data.num_workers=2", "data.batch_size=4", "augment=randaugment", "model.dim=32", "model.depth=1",
                     "model.heads=2", "model.dim_head=16", "model.mlp_dim=64"]
    metrics, weights = interrupted_and_whole(tmp_path, data_dir, overrides, steps, steps + steps // 3, signals)
    whole = metrics["whole"]
    for sig in signals:
        cut = metrics[sig.name]
        assert cut["status"] == "completed" and cut["global_step"] == whole["global_step"] == 2 * steps
        assert (cut["test/acc"], cut["test/loss"]) == (whole["test/acc"], whole["test/loss"]), sig.name
        assert all(torch.equal(weights["whole"][k], weights[sig.name][k]) for k in weights["whole"]), sig.name


def test_decoding_on_the_device_gives_the_batches_of_the_workers(folder, tmp_path, data_dir):
    """data.decode_on=device (meant for nvJPEG on a GPU): the workers only read the files and
    each batch is decoded in the main process on the training device, here the CPU, with the
    same decoder and seeded crops, so the batches equal the workers'; a broken file is dropped
    from its batch and counted, in a real run."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(training=True, testing=False, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    batches = {}
    for where in ("workers", "device"):
        dm = datamodule(folder, in_memory=False, decode_on=where, num_workers=1, mean=[0.5] * 3, std=[0.25] * 3)
        dm.setup("fit")
        dm.trainer = trainer
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(3)
        batches[where] = [dm.on_before_batch_transfer(batch, 0) for batch in loader]
    assert len(batches["device"]) == len(batches["workers"]) == 3
    for (a, la, _), (b, lb, _) in zip(batches["workers"], batches["device"]):
        assert torch.equal(a, b) and torch.equal(la, lb)

    broken = folder / "train" / "owl" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    run_entry("vitlab.train", "data=imagefolder", f"data.root={folder}", "data.image_size=16", "data.in_memory=false",
              "data.num_workers=1", "data.batch_size=4", "data.decode_on=device", "data.on_bad_file=skip",
              "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "model.dim=32", "model.depth=1",
              "model.heads=2", "model.dim_head=16", "model.mlp_dim=64", "logger=csv", "torch_threads=1", "name=skip",
              cwd=tmp_path, data_dir=data_dir)
    skipped = json.loads((tmp_path / "outputs" / "runs" / "skip" / "metrics.json").read_text())
    assert skipped["status"] == "completed" and skipped["skipped_file_names"] == [str(broken)]
