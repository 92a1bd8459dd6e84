"""The Hydra entry point end to end on real Fashion-MNIST slices."""

import json
import re
from pathlib import Path

import pytest

from conftest import SLICE, run_entry
from tbutil import hparams, hparams_tab, load, scalar_tags
from vitlab.budget import cpu_name

LOGGED = {"train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "train/lr"}


def only(paths):
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def test_short_training_run_from_any_folder(tmp_path, data_dir):
    result = run_entry("vitlab.train", *SLICE, "seed=3", "tags=[smoke]", cwd=tmp_path, data_dir=data_dir)
    run = only(tmp_path.glob("outputs/runs/*/*"))

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["epochs"] == 2 and metrics["global_step"] == 16
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/loss"] > 0
    assert 0.0 <= metrics["best_val_acc"] <= 1.0
    assert metrics["params"] > 10_000 and metrics["flops_per_image"] > 0
    assert metrics["train_images_per_s"] > 0 and metrics["wall_time_s"] > 0
    assert metrics["tags"] == ["smoke"] and metrics["seed"] == 3
    assert re.fullmatch(rf"{re.escape(cpu_name())}, (1 thread|\d+ threads)", metrics["machine"])
    # The learning curves, epoch by epoch, as curves.png and any tracker draw them.
    history = metrics["history"]
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 8), (2, 16)]
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "train/lr"} <= set(history[-1])
    assert metrics["best_val_acc"] == pytest.approx(max(h["val/acc"] for h in history))
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"

    config = (run / "config.yaml").read_text()
    assert "${" not in config and "patch_size: 4" in config, "the resolved config is saved"
    assert Path(metrics["best_checkpoint"]).is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "best-epoch" in metrics["best_checkpoint"]
    assert "Restoring states from the checkpoint path" in result.stdout + result.stderr  # tested on the best

    assert LOGGED <= scalar_tags(run)
    values, metric_tags = hparams(run)
    assert {"hp/best_val_acc", "hp/test_acc", "hp/test_loss"} <= set(metric_tags)
    assert "hp_metric" not in metric_tags
    assert values["model/patch_size"] == 4 and values["optimizer/lr"] == 2e-3 and values["choice/data"] == "fashion_mnist"
    test_acc = load(run).Scalars("hp/test_acc")[-1].value
    assert abs(test_acc - metrics["test/acc"]) < 1e-6


def test_multirun_gives_one_folder_per_job(tmp_path, data_dir):
    run_entry("vitlab.train", "-m", "model.patch_size=4,7", *SLICE, "trainer.max_epochs=1", cwd=tmp_path, data_dir=data_dir)
    sweep = only(tmp_path.glob("outputs/multirun/*/*"))
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0_model.patch_size=4", "1_model.patch_size=7"]
    for job, patch in zip(jobs, (4, 7)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["status"] == "completed"
        assert f"patch_size: {patch}" in (sweep / job / "config.yaml").read_text()
        assert {"train/loss", "val/acc", "test/acc"} <= scalar_tags(sweep / job)
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        # The HParams tab's row of this job, read back through TensorBoard's own reader.
        values, metric_tags = hparams(sweep / job)
        assert values["model/patch_size"] == patch and values["seed"] == 0
        assert {"hp/best_val_acc", "hp/test_acc", "hp/test_loss"} <= set(metric_tags)
        assert abs(load(sweep / job).Scalars("hp/test_acc")[-1].value - metrics["test/acc"]) < 1e-6
        assert (sweep / job / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # TensorBoard's HParams tab, opened on all outputs: the swept key is its first column (the tab
    # shows five), the hp/* metrics are the metric columns, and a trial is named by its job folder.
    infos, metric_tags, trials = hparams_tab(tmp_path / "outputs")
    assert infos[0]["name"] == "model/patch_size" and infos[0]["differs"]
    assert not any(info.get("differs") for info in infos[1:])
    assert metric_tags == ["hp/best_val_acc", "hp/test_acc", "hp/test_loss"]
    assert [trial.split(" ")[0] for trial in trials] == jobs and trials[0].endswith(f"({sweep.parent.name}/{sweep.name})")


def test_invalid_patch_size_fails_before_training(tmp_path, data_dir):
    result = run_entry("vitlab.train", *SLICE, "model.patch_size=5", cwd=tmp_path, data_dir=data_dir, check=False)
    assert result.returncode != 0
    assert "error: ValueError: model.patch_size=5 does not divide model.image_size=28" in result.stderr
    assert "Traceback" not in result.stderr, "a config mistake gets a message, not a traceback"
    run = only(tmp_path.glob("outputs/runs/*/*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "does not divide" in metrics["error"]
    assert not (run / "checkpoints").exists()


def test_diverging_learning_rate_stops_the_run_naming_the_step(tmp_path, data_dir):
    result = run_entry("vitlab.train", *SLICE, "optimizer.lr=1e6", "module.label_smoothing=0", cwd=tmp_path, data_dir=data_dir, check=False)
    assert result.returncode == 1
    assert "error: FloatingPointError: train/loss is nan at step" in result.stderr
    metrics = json.loads(only(tmp_path.glob("outputs/runs/*/*/metrics.json")).read_text())
    assert metrics["status"] == "failed" and "lower optimizer.lr" in metrics["error"]


def test_missing_data_is_one_sentence_before_training(tmp_path, data_dir):
    result = run_entry("vitlab.train", *SLICE, "data.download=false", cwd=tmp_path, data_dir=tmp_path / "empty", check=False)
    assert result.returncode == 1
    assert "put train-images-idx3-ubyte.gz" in result.stderr and str(tmp_path / "empty" / "FashionMNIST" / "raw") in result.stderr
    assert "Traceback" not in result.stderr
    metrics = json.loads(only(tmp_path.glob("outputs/runs/*/*/metrics.json")).read_text())
    assert metrics["status"] == "failed" and "global_step" not in metrics
