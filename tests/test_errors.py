"""Mistakes on the command line stop `python -m vitlab.train` before training with a short
message naming the value, a non-zero exit and no traceback; nothing looks like a finished run.

The entry point runs in this process (tests/inprocess.py): every case fails before training
(``test_train.py`` runs the same path in a subprocess).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SLICE
from inprocess import assert_short_failure, run_in_process
from test_checkpoint import Payload, module_for, save_checkpoint
from vitlab.train import main as train_main


@pytest.fixture
def run_train(tmp_path, data_dir, monkeypatch, capsys):
    """``python -m vitlab.train <overrides>`` in this process: returncode, stdout, stderr."""
    return lambda *overrides: run_in_process(train_main, "vitlab.train", overrides, cwd=tmp_path, data_dir=data_dir,
                                             monkeypatch=monkeypatch, capsys=capsys)


def test_override_of_the_wrong_type(tmp_path, run_train):
    result = run_train(*SLICE, "model.depth=six")
    assert_short_failure(result, "error: ValueError: model.depth='six'")
    (metrics,) = tmp_path.glob("outputs/runs/*/*/metrics.json")
    assert json.loads(metrics.read_text())["status"] == "failed"
    assert not (metrics.parent / "checkpoints").exists()


@pytest.mark.parametrize("override, fragments", [
    ("model.dimm=64", ["error: Could not override 'model.dimm'", "Key 'dimm' is not in struct (did you mean model.dim",
                       "use +model.dimm=64"]),
    ("data=fashion", ["error: In 'train': Could not find 'data/fashion'", "Available options in 'data':",
                      "fashion_mnist, "]),
    ("model.patch_size=[4,", ["error: cannot parse the override 'model.patch_size=[4,'"]),
])
def test_misspelled_key_or_option_is_one_line(tmp_path, run_train, override, fragments):
    """Hydra's own composition errors, in one line (Hydra prints several and a hint about
    HYDRA_FULL_ERROR): errors.hydra_errors_in_one_line."""
    result = run_train(override)
    assert_short_failure(result, *fragments)
    assert [line for line in result.stderr.splitlines() if line.strip()] == [result.stderr.strip()], result.stderr
    assert not (tmp_path / "outputs").exists(), "no run folder for a config that does not compose"


@pytest.mark.parametrize("override, message", [
    ("trainer.max_epochs=ten", "trainer.max_epochs='ten' must be an integer or null (the max_epochs of "
                               "lightning.pytorch.Trainer)"),
    ("optimizer.lr=3e-4x", "optimizer.lr='3e-4x' must be a number (the lr of torch.optim.AdamW)"),
    ("seed=first", "seed='first' must be an integer"),
    ("+trainer.max_epoch=1", "trainer.max_epoch is not an argument of lightning.pytorch.Trainer: did you mean "
                             "trainer.max_epochs"),
    ("+optimizer.momentum=0.9", "optimizer.momentum is not an argument of torch.optim.AdamW: remove it"),
])
def test_text_for_a_number_or_an_unknown_argument_stops_before_training(tmp_path, run_train, override, message):
    """Values that Lightning or torch would only reject deep inside (a TypeError naming neither the
    field nor the value), checked against the type hints and arguments of each section's target."""
    result = run_train(*SLICE, override)
    assert_short_failure(result, f"error: ValueError: {message}")
    assert not list(tmp_path.glob("outputs/runs/*/*/metrics.json")), "refused before the run's record is written"


def checkpoint_file(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "nowhere" / "last.ckpt"
    path = tmp_path / f"{kind}.ckpt"
    if kind == "text":
        path.write_text("this is a text file\n")
    elif kind == "other-model":
        module, cfg = module_for(dim=64)
        save_checkpoint(path, module, {**cfg, "patch_size": 4, "depth": 2})
    elif kind == "tampered":
        module, cfg = module_for()
        save_checkpoint(path, module, cfg, extra=Payload(tmp_path / "payload-ran"))
    return path


@pytest.mark.parametrize("kind, fragment", [
    ("missing", "error: FileNotFoundError: ckpt_path={path} does not exist"),
    ("text", "error: CheckpointError: ckpt_path={path} is not a PyTorch checkpoint"),
    ("other-model", "error: CheckpointError: ckpt_path={path} comes from a model with a different configuration: "
                    "model.dim: checkpoint 64, config 32."),
    ("tampered", "error: UnsafeCheckpointError: ckpt_path={path} was refused: it holds code to run when loaded"),
])
def test_bad_ckpt_path_stops_before_training(tmp_path, run_train, kind, fragment):
    path = checkpoint_file(tmp_path, kind)
    result = run_train(*SLICE, f"ckpt_path={path}")
    assert result.returncode == 1
    assert_short_failure(result, fragment.format(path=path))
    assert not (tmp_path / "payload-ran").exists()
    (metrics,) = tmp_path.glob("outputs/runs/*/*/metrics.json")
    recorded = json.loads(metrics.read_text())
    assert recorded["status"] == "failed" and "global_step" not in recorded
    assert not (metrics.parent / "checkpoints").exists()


@pytest.mark.parametrize("override", ["trainer.max_epochs=0", "trainer.max_steps=0"])
def test_a_run_that_trains_nothing_is_refused_before_anything_is_built(tmp_path, run_train, override):
    result = run_train(*SLICE, override)
    assert_short_failure(result, f"error: ValueError: {override} trains nothing: set it above 0",
                         "python -m vitlab.eval ckpt_path=")
    assert not list(tmp_path.glob("outputs/runs/*/*/metrics.json")), "nothing is recorded as a run"


def test_user_error_keeps_its_traceback_in_the_log_file(tmp_path, run_train):
    result = run_train(*SLICE, "model.patch_size=5")
    assert_short_failure(result, "error: ValueError: model.patch_size=5", "(traceback in ")
    log = Path(result.stderr.split("(traceback in ")[1].split(")")[0])
    assert log.name == "train.log" and "Traceback (most recent call last)" in log.read_text()


def test_resume_into_a_folder_trained_with_other_settings(tmp_path, run_train):
    """name=<run> again with another model: the automatic resume names the fields and the fix."""
    run = tmp_path / "outputs" / "runs" / "mine" / "checkpoints"
    run.mkdir(parents=True)
    module, cfg = module_for(dim=64)
    save_checkpoint(run / "last.ckpt", module, {**cfg, "patch_size": 4, "depth": 2})
    result = run_train(*SLICE, "name=mine")
    assert_short_failure(result, "model.dim: checkpoint 64, config 32", "or resume=false to train from scratch")
    assert torch.load(run / "last.ckpt", weights_only=True)["state_dict"].keys() == module.state_dict().keys()


def test_an_error_while_the_progress_bar_draws_starts_its_own_line(tmp_path, data_dir):
    """A run that diverges with the progress bar on: the bar (on stdout) keeps its line and the
    one-line error (on stderr) starts the next, as a terminal showing both prints them."""
    overrides = [o for o in SLICE if not o.startswith("trainer.enable_progress_bar=")]
    env = {**os.environ, "VITLAB_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("VITLAB_OUTPUT_DIR", None)
    result = subprocess.run([sys.executable, "-m", "vitlab.train", *overrides, "trainer.enable_progress_bar=true",
                             "optimizer.lr=1e6", "module.label_smoothing=0", "trainer.max_epochs=1", "torch_threads=1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    out = result.stdout  # bytes: a bar redraws its line after a carriage return, not a newline
    assert result.returncode == 1, out[-3000:]
    before, error, _ = out.partition(b"error: FloatingPointError: train/loss is nan")
    assert error, out[-3000:]
    assert b"Epoch 0:" in before.rstrip(b"\n").rpartition(b"\n")[2], "the bar was drawing"
    assert before.endswith(b"\n"), f"the error starts its own line, not the bar's: {before[-200:]!r}"


def test_eval_refuses_an_argument_its_trainer_does_not_take(tmp_path, data_dir, monkeypatch, capsys):
    from vitlab.eval import main as eval_main

    result = run_in_process(eval_main, "vitlab.eval", ["ckpt_path=nowhere.ckpt", "+trainer.devicess=1"], cwd=tmp_path,
                            data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert_short_failure(result, "error: ValueError: trainer.devicess is not an argument of lightning.pytorch.Trainer: "
                                 "did you mean trainer.devices?")
