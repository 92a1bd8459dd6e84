"""Experiment trackers: a sweep read back from MLflow, W&B offline runs, and the one line a
missing tracker package gives."""

from __future__ import annotations

import importlib.util
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONFIG_DIR, SLICE, run_entry
from inprocess import assert_short_failure, run_in_process

from vitlab.config import quote_path_overrides
# Imported here, not under a test's captured output: Lightning's log handlers keep the stream they found.
from vitlab.eval import main as eval_main
from vitlab.train import main as train_main


def test_mlflow_sweep_is_one_experiment_with_a_run_per_job(tmp_path, data_dir, monkeypatch, capsys):
    mlflow = pytest.importorskip("mlflow")
    # Job 1 diverges at its first step: a failure after the trackers are set up.
    result = run_entry("vitlab.train", "-m", "optimizer.lr=1e-3,1e6", "module.label_smoothing=0", "logger=mlflow",
                       "sweep=lr", *SLICE, "trainer.max_epochs=1", "torch_threads=1", cwd=tmp_path, data_dir=data_dir,
                       check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runs = mlflow.search_runs(experiment_names=["lr"], order_by=["tags.`mlflow.runName`"])
    assert list(runs["tags.mlflow.runName"]) == ["0_optimizer.lr=0.001", "1_optimizer.lr=1000000.0"]
    assert list(runs["params.optimizer.lr"]) == ["0.001", "1000000.0"]
    assert (runs["tags.sweep"] == "lr").all() and (runs["tags.swept_keys"] == "optimizer.lr").all()
    assert {"params.model.dim", "params.trainer.max_epochs", "params.seed"} <= set(runs.columns)
    done, failed = runs.iloc[0], runs.iloc[1]
    assert (done["status"], done["tags.status"]) == ("FINISHED", "completed")
    assert 0 <= done["metrics.test/acc"] <= 1 and "metrics.val/acc" in runs and "metrics.train/loss" in runs
    assert (failed["status"], failed["tags.status"]) == ("FAILED", "failed")
    assert failed["tags.error"].startswith("FloatingPointError: train/loss is nan at step")
    client = mlflow.MlflowClient()
    assert {a.path for a in client.list_artifacts(done["run_id"])} == {"config.yaml", "metrics.json", "curves.png"}
    assert {a.path for a in client.list_artifacts(failed["run_id"])} == {"config.yaml", "metrics.json"}

    # vitlab.eval adds its confusion matrix to the run the checkpoint came from.
    ckpt = tmp_path / "outputs" / "multirun" / "lr" / done["tags.mlflow.runName"] / "checkpoints" / "last.ckpt"
    args = quote_path_overrides(["eval", f"ckpt_path={ckpt}", "trainer.limit_test_batches=2"])[1:]
    evaluated = run_in_process(eval_main, "vitlab.eval", args, cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch,
                               capsys=capsys)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert {a.path for a in client.list_artifacts(done["run_id"], "eval")} == {
        "eval/confusion_matrix.png", "eval/confusion_matrix.csv", "eval/per_class_accuracy.csv"}


def test_a_run_that_fails_before_its_trainer_exists_is_tracked_as_failed(tmp_path, data_dir, monkeypatch, capsys):
    mlflow = pytest.importorskip("mlflow")
    result = run_in_process(train_main, "vitlab.train", ["logger=mlflow", "name=bad", "model.patch_size=5", *SLICE],
                            cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert_short_failure(result, "model.patch_size=5 does not divide")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["runs"])
    assert len(runs) == 1 and (runs.iloc[0]["status"], runs.iloc[0]["tags.status"]) == ("FAILED", "failed")
    assert runs.iloc[0]["tags.error"].startswith("ValueError: model.patch_size=5 does not divide")


def test_wandb_writes_an_offline_run_into_the_run_folder(tmp_path, data_dir):
    pytest.importorskip("wandb")
    # W&B keeps artifact copies in its own data and cache folders: the test's, here.
    env = {"WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    run_entry("vitlab.train", "logger=wandb", "name=wb", *SLICE, "trainer.max_epochs=1", "torch_threads=1",
              cwd=tmp_path, data_dir=data_dir, env=env)
    run_dir = tmp_path / "outputs" / "runs" / "wb"
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert next(offline.glob("run-*.wandb")).stat().st_size > 0
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_a_missing_tracker_package_gives_one_line(package, tmp_path, data_dir, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    result = run_in_process(train_main, "vitlab.train", [f"logger={package}", *SLICE], cwd=tmp_path, data_dir=data_dir,
                            monkeypatch=monkeypatch, capsys=capsys)
    assert_short_failure(result, f'error: ValueError: logger={package} needs the {package} package: '
                                 f'pip install -e ".[{package}]"')


def test_many_combines_every_logger_and_a_list_any_of_them():
    def loggers(choice: str) -> set[str]:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return set(compose("train", overrides=[f"logger={choice}"]).logger)

    assert loggers("many") == {"tensorboard", "csv", "mlflow", "wandb"}
    assert loggers("[tensorboard,mlflow]") == {"tensorboard", "mlflow"}
