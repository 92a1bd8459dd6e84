"""Checkpoints: opened without running code, refused with a clear message when they are not
checkpoints or come from another model, and resumable to the same result after a SIGKILL."""

import csv
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from conftest import SLICE, run_entry
from vitlab.callbacks import rng_states, set_rng_states
from vitlab.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    check_compatible,
    load_checkpoint,
)
from vitlab.models import SimpleViT
from vitlab.module import ImageClassifier

MODEL = {"_target_": "vitlab.models.SimpleViT", "image_size": 28, "channels": 1, "num_classes": 10, "patch_size": 7,
         "dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "mlp_dim": 64}


def module_for(**changes):
    cfg = {**MODEL, **changes}
    net = SimpleViT(**{k: v for k, v in cfg.items() if k != "_target_"})
    return ImageClassifier(net=net, num_classes=cfg["num_classes"], optimizer=None), cfg


def save_checkpoint(path, module, model_cfg=None, **extra):
    payload = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 1, **extra}
    if model_cfg is not None:
        payload["vitlab"] = {"model": model_cfg}
    torch.save(payload, path)
    return path


class Payload:
    """Unpickling this creates ``marker``: what a tampered checkpoint would do with os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tampered_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    module, cfg = module_for()
    path = save_checkpoint(tmp_path / "tampered.ckpt", module, cfg, extra=Payload(marker))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert "was refused: it holds code to run when loaded" in str(info.value) and "GLOBAL" in str(info.value)
    assert not marker.exists(), "the payload ran"
    # A bare pickle (no torch zip) is refused before any unpickling.
    with open(tmp_path / "bare.ckpt", "wb") as f:
        pickle.dump({"state_dict": {}, "x": Payload(marker)}, f)
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "bare.ckpt")
    assert not marker.exists()
    # The payload is real: an unsafe load runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def bad_files(tmp_path):
    module, cfg = module_for()
    good = save_checkpoint(tmp_path / "good.ckpt", module, cfg).read_bytes()
    (tmp_path / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "notes.ckpt").write_text("epoch 3, val acc 0.91\n")
    (tmp_path / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with zipfile.ZipFile(tmp_path / "archive.ckpt", "w") as archive:
        archive.writestr("weights.txt", "a zip, but not what torch.save writes")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "last.ckpt").write_bytes(good)


@pytest.mark.parametrize("name, error, fragment", [
    ("missing.ckpt", FileNotFoundError, "does not exist: pass the path of a .ckpt file"),
    ("random.ckpt", CheckpointError, "is not a PyTorch checkpoint"),
    ("notes.ckpt", CheckpointError, "is not a PyTorch checkpoint"),
    ("truncated.ckpt", CheckpointError, "is not a PyTorch checkpoint"),
    ("empty.ckpt", CheckpointError, "is not a PyTorch checkpoint"),
    ("list.ckpt", CheckpointError, "holds no model weights (no state_dict)"),
    ("archive.ckpt", CheckpointError, "is a damaged checkpoint"),
    ("folder", CheckpointError, "is a folder: pass one of ['last.ckpt']"),
])
def test_not_a_checkpoint(tmp_path, name, error, fragment):
    bad_files(tmp_path)
    with pytest.raises(error) as info:
        load_checkpoint(tmp_path / name)
    assert str(info.value).startswith(f"ckpt_path={tmp_path / name} ") and fragment in str(info.value)


def test_other_model_configuration_names_the_fields(tmp_path):
    trained, trained_cfg = module_for(dim=64, depth=2)
    path = save_checkpoint(tmp_path / "a.ckpt", trained, trained_cfg)
    checkpoint = load_checkpoint(path)
    module, cfg = module_for(attention="sdpa")  # the attention kernel may differ
    with pytest.raises(CheckpointError) as info:
        check_compatible(checkpoint, path, cfg, module)
    message = str(info.value)
    assert ("comes from a model with a different configuration: "
            "model.depth: checkpoint 2, config 1; model.dim: checkpoint 64, config 32.") in message
    assert "attention" not in message
    check_compatible(checkpoint, path, {**cfg, "dim": 64, "depth": 2}, module_for(dim=64, depth=2)[0])

    # Without a saved config the weights' shapes are compared.
    (tmp_path / "bare").mkdir()
    bare = save_checkpoint(tmp_path / "bare" / "b.ckpt", trained)
    with pytest.raises(CheckpointError) as info:
        check_compatible(load_checkpoint(bare), bare, cfg, module)
    assert "net.linear_head.weight: checkpoint (10, 64), model (10, 32)" in str(info.value)
    assert "not in the model: net.transformer.layers.1" in str(info.value)
    assert "missing in the checkpoint" not in str(info.value)


def test_rng_states_survive_a_safe_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save({"rng": rng_states()}, tmp_path / "rng.pt")
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def last_logged_step(csv_path):
    try:
        with open(csv_path) as f:
            return max((int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")), default=-1)
    except (OSError, ValueError, KeyError):
        return -1


def test_run_killed_mid_epoch_resumes_to_the_same_final_metrics(tmp_path, data_dir):
    """trainer.deterministic=true, fixed seed: SIGKILL in the middle of epoch 2, resume, and the
    test metrics and final weights equal those of an uninterrupted run (the checkpoint carries
    the generators' states, so the resumed epoch draws the same batches and augmentations)."""
    steps = 40
    overrides = [*SLICE, "trainer.max_epochs=2", f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=1",
                 "trainer.limit_test_batches=2", "data.batch_size=32", "trainer.deterministic=true", "torch_threads=1",
                 # Test the final weights (not the best epoch), and log every step to a CSV read while it runs.
                 "callbacks.model_checkpoint.monitor=null", "logger=csv", "+logger.csv.flush_logs_every_n_steps=1"]
    run_entry("vitlab.train", *overrides, "name=whole", cwd=tmp_path, data_dir=data_dir)

    run = tmp_path / "outputs" / "runs" / "cut"
    env = {**os.environ, "VITLAB_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "vitlab.train", *overrides, "name=cut"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while last_logged_step(run / "csv" / "metrics.csv") < steps + 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = last_logged_step(run / "csv" / "metrics.csv")
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert steps < killed_at < 2 * steps - 1 and saved["global_step"] == steps, "killed in the middle of epoch 2"

    run_entry("vitlab.train", *overrides, "name=cut", cwd=tmp_path, data_dir=data_dir)
    whole = json.loads((tmp_path / "outputs" / "runs" / "whole" / "metrics.json").read_text())
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["status"] == "completed" and resumed["global_step"] == whole["global_step"] == 2 * steps
    assert (resumed["test/acc"], resumed["test/loss"]) == (whole["test/acc"], whole["test/loss"])
    runs = tmp_path / "outputs" / "runs"
    final = {name: torch.load(runs / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
             for name in ("whole", "cut")}
    assert all(torch.equal(final["whole"][k], final["cut"][k]) for k in final["whole"])
