"""timm's models as vitlab's network: ``model=timm model.name=<timm name>``."""

from __future__ import annotations

import json

import pytest
from conftest import run_entry
from inprocess import assert_short_failure, run_in_process

from vitlab.models.timm_model import create
from vitlab.train import main as train_main

FAST = ("debug=fast", "model=timm", "trainer.enable_progress_bar=false", "logger=none", "torch_threads=1")


def test_a_timm_vit_trains_records_and_evaluates_like_simplevit(tmp_path, data_dir):
    run_entry("vitlab.train", *FAST, "name=deit", "model.kwargs.drop_path_rate=0.1", cwd=tmp_path,
              data_dir=data_dir)
    run = tmp_path / "outputs/runs/deit"
    metrics = json.loads((run / "metrics.json").read_text())
    # deit_tiny at patch 7 on 28 px, 1 channel, 10 classes.
    assert metrics["status"] == "completed" and metrics["params"] == 5_353_738 and metrics["flops_per_image"] > 0
    (best,) = (run / "checkpoints").glob("best*.ckpt")
    result = run_entry("vitlab.eval", f"ckpt_path={best}", "name=deit_eval", "+data.eval_batch_size=64",
                       "+trainer.limit_test_batches=2", cwd=tmp_path, data_dir=data_dir)
    assert json.loads((tmp_path / "outputs/eval/deit_eval/metrics.json").read_text())["test/acc"] == \
        pytest.approx(metrics["test/acc"]), result.stderr[-2000:]


@pytest.mark.parametrize("override, fragment", [
    ("model.name=deit_tiny_patch15", "is not a timm model"),
    ("model.patch_size=null", "cuts 16x16 patches, which do not divide data.image_size=28: set model.patch_size"),
    ("model.name=resnet18", "resnet18 takes no patch size"),
    ("model.pretrained=true", "model.pretrained=true: timm could not fetch the weights of deit_tiny_patch16_224"),
])
def test_bad_timm_settings_are_named_in_one_line(tmp_path, data_dir, monkeypatch, capsys, override, fragment):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: fail at once rather than after timeouts
    result = run_in_process(train_main, "vitlab.train", [*FAST, "name=bad", override], cwd=tmp_path,
                            data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert_short_failure(result, fragment)


def test_a_cnn_reads_the_image_at_its_own_size():
    net = create(name="resnet18", image_size=28, channels=1, num_classes=10, patch_size=None)
    assert net.get_classifier().out_features == 10 and net.conv1.in_channels == 1
