"""Experiment trackers: a sweep read back from MLflow, W&B offline runs, one tracker run for a
run killed and resumed, and the one line a missing tracker package or a bad URI, project or
folder gives."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONFIG_DIR, SLICE, run_entry
from inprocess import assert_short_failure, run_in_process

from vitlab.config import quote_path_overrides
# Imported here, not under a test's captured output: Lightning's log handlers keep the stream they found.
from vitlab.eval import main as eval_main
from vitlab.tracking import wandb_history
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
    # Marked as model training: MLflow's UI opens the experiment on its runs table.
    assert mlflow.get_experiment_by_name("lr").tags["mlflow.experimentKind"] == "custom_model_development"
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


# --- One tracker run per training run, across a kill and a resume -------------------------------

STEPS = 8  # training steps per epoch
RESUMED = [*SLICE, "trainer.max_epochs=3", "trainer.limit_val_batches=1", "torch_threads=1", "name=cut",
           "logger=[csv,mlflow,wandb]", "+logger.csv.flush_logs_every_n_steps=1"]
# Lightning logs an epoch's validation at the epoch's last training step.
EPOCH_ENDS = [STEPS - 1, 2 * STEPS - 1, 3 * STEPS - 1]


def wandb_env(tmp_path) -> dict[str, str]:
    """W&B keeps artifact copies in its own data and cache folders: the test's, here."""
    return {key: str(tmp_path / key.lower()) for key in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")}


def last_logged_step(path) -> int:
    try:
        with open(path) as f:
            return max((int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")), default=-1)
    except (OSError, ValueError, KeyError):
        return -1


def stop_in_epoch_2(tmp_path, data_dir, sig: signal.Signals) -> tuple[Path, int]:
    """Start the run and send ``sig`` a few steps into epoch 2; its folder and the last step logged."""
    env = {**os.environ, "VITLAB_DATA_DIR": str(data_dir), **wandb_env(tmp_path)}
    env.pop("VITLAB_OUTPUT_DIR", None)
    run = tmp_path / "outputs" / "runs" / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "vitlab.train", *RESUMED], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while last_logged_step(run / "csv" / "metrics.csv") < STEPS + 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    assert proc.wait(timeout=300) == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
    return run, last_logged_step(run / "csv" / "metrics.csv")


def resume_and_read_back(tmp_path, data_dir, run: Path, first: dict):
    """Run the same command again; the run's one MLflow run, its W&B id and history rows."""
    import mlflow

    run_entry("vitlab.train", *RESUMED, cwd=tmp_path, data_dir=data_dir, env=wandb_env(tmp_path))
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "completed" and record["global_step"] == 3 * STEPS
    assert record["tracking"] == first["tracking"], "the resumed run names the same tracker runs"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("runs")
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_id == record["tracking"]["mlflow"]["run_id"]
    assert (tracked.info.status, tracked.data.tags["status"]) == ("FINISHED", "completed")
    assert "error" not in tracked.data.tags and "changed_on_resume" not in tracked.data.tags
    assert tracked.data.params["trainer.max_epochs"] == "3"
    wandb_id = record["tracking"]["wandb"]["id"]
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(folder.name.endswith(f"-{wandb_id}") for folder in offline), "one W&B id"
    rows = [row for folder in offline for row in wandb_history(folder / f"run-{wandb_id}.wandb")]
    return client, tracked, rows


def steps_of(rows: list[dict], key: str) -> list[int]:
    return sorted(row["trainer/global_step"] for row in rows if key in row)


def test_a_run_killed_and_resumed_is_one_mlflow_run_with_one_value_per_step(tmp_path, data_dir):
    """SIGKILL in the middle of epoch 2 of 3, then the same command again: the run resumes from
    epoch 1's last.ckpt and trains steps 9, 10, ... again, and its MLflow run is the first
    attempt's, with one value per step of every metric (the repeated steps are not sent twice)
    and one val/acc per epoch, status FINISHED."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    run, killed_at = stop_in_epoch_2(tmp_path, data_dir, signal.SIGKILL)
    first = json.loads((run / "metrics.json").read_text())
    assert first["status"] == "running" and set(first["tracking"]) == {"mlflow", "wandb"}
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == STEPS < killed_at < 2 * STEPS, "killed in epoch 2, after epoch 1's checkpoint"

    client, tracked, rows = resume_and_read_back(tmp_path, data_dir, run, first)
    assert client.get_experiment(tracked.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert sorted(m.step for m in client.get_metric_history(tracked.info.run_id, "val/acc")) == EPOCH_ENDS
    train = sorted(m.step for m in client.get_metric_history(tracked.info.run_id, "train/loss"))
    assert train == list(range(3 * STEPS)), "one value per step, none twice"
    # W&B writes its offline file in blocks: what the killed process had not written is lost, so
    # only the resumed part is certain to be there; nothing is there twice.
    for key in ("train/loss", "val/acc"):
        assert steps_of(rows, key) == sorted(set(steps_of(rows, key)))
    assert steps_of(rows, "val/acc")[-2:] == EPOCH_ENDS[-2:]


def test_a_run_stopped_by_sigterm_and_resumed_is_one_wandb_run(tmp_path, data_dir):
    """SIGTERM in the middle of epoch 2 (a checkpoint at that step; W&B and MLflow closed, the
    MLflow run KILLED), then the same command again: both offline folders carry one W&B id and
    together every step once, val/acc once per epoch; the MLflow run is RUNNING again, then
    FINISHED."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    import mlflow

    run, stopped_at = stop_in_epoch_2(tmp_path, data_dir, signal.SIGTERM)
    first = json.loads((run / "metrics.json").read_text())
    assert first["status"] == "interrupted"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    assert client.get_run(first["tracking"]["mlflow"]["run_id"]).info.status == "KILLED"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert STEPS < saved["global_step"] < 2 * STEPS, "stopped in epoch 2"

    client, tracked, rows = resume_and_read_back(tmp_path, data_dir, run, first)
    assert steps_of(rows, "val/acc") == EPOCH_ENDS, "one val/acc per epoch"
    assert steps_of(rows, "train/loss") == list(range(3 * STEPS)), "every step once"
    assert sorted(m.step for m in client.get_metric_history(tracked.info.run_id, "val/acc")) == EPOCH_ENDS


def test_a_resumed_mlflow_run_keeps_its_first_params_and_is_sent_each_step_once(tmp_path):
    """The logger of a resumed run, against a SQLite store: the run that metrics.json names is
    RUNNING again without its earlier error; a parameter that changed goes into a tag (MLflow
    refuses to change one); a step already held is not sent again. A run the store does not have
    gives a new run."""
    pytest.importorskip("mlflow")
    from vitlab.rundir import write_json
    from vitlab.tracking import mlflow_logger, run_ids

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    first = mlflow_logger(str(tmp_path), str(run_dir))
    first.log_hyperparams({"trainer.max_epochs": 2, "seed": 0})
    for step in range(5):
        first.log_metrics({"train/loss": float(step)}, step=step)
    client, run_id = first.experiment, first.run_id
    client.set_tag(run_id, "error", "FloatingPointError: ...")
    client.set_terminated(run_id, "FAILED")
    write_json(run_dir / "metrics.json", {"status": "failed", "tracking": run_ids([first])})

    again = mlflow_logger(str(tmp_path), str(run_dir))
    assert again.run_id == run_id
    reopened = client.get_run(run_id)
    assert reopened.info.status == "RUNNING" and "error" not in reopened.data.tags
    again.log_hyperparams({"trainer.max_epochs": 4, "seed": 0, "trainer.devices": 1})
    for step in range(3, 8):
        again.log_metrics({"train/loss": 10.0 + step}, step=step)
    run = client.get_run(run_id)
    assert run.data.params == {"trainer.max_epochs": "2", "seed": "0", "trainer.devices": "1"}
    assert run.data.tags["changed_on_resume"] == "trainer.max_epochs: 2 -> 4"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert history == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0), (6, 16.0), (7, 17.0)]

    write_json(run_dir / "metrics.json", {"tracking": {"mlflow": {**run_ids([first])["mlflow"], "run_id": "0" * 32}}})
    assert mlflow_logger(str(tmp_path), str(run_dir)).run_id not in (None, run_id, "0" * 32)


def test_a_deleted_mlflow_experiment_gives_one_line(tmp_path):
    pytest.importorskip("mlflow")
    from vitlab.tracking import mlflow_logger

    run_dir = tmp_path / "runs" / "r"
    client = mlflow_logger(str(tmp_path), str(run_dir), experiment_name="gone").experiment
    experiment_id = client.get_experiment_by_name("gone").experiment_id
    client.delete_experiment(experiment_id)
    with pytest.raises(ValueError, match=rf"logger.mlflow.experiment_name=gone is a deleted MLflow experiment \(id "
                                         rf"{experiment_id}\): restore it \(mlflow experiments restore "):
        mlflow_logger(str(tmp_path), str(run_dir), experiment_name="gone")


def test_wandb_history_reads_every_row_of_an_offline_run_file(tmp_path, monkeypatch):
    """A W&B offline file of several 32 KiB blocks, with records split across them, read back whole."""
    wandb = pytest.importorskip("wandb")
    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    run = wandb.init(mode="offline", dir=str(tmp_path), project="vitlab", id="blocks01", settings=wandb.Settings(
        console="off", x_disable_stats=True))
    for step in range(3000):
        run.log({"trainer/global_step": step, "train/loss": 1.0 / (step + 1), "note": "x" * (step % 97)})
    run.finish()
    (path,) = tmp_path.glob("wandb/offline-run-*-blocks01/run-blocks01.wandb")
    deadline = time.time() + 60
    while len(rows := wandb_history(path)) < 3000 and time.time() < deadline:
        time.sleep(0.5)  # W&B's writer may still be flushing the end of the file after finish()
    assert path.stat().st_size > 3 * 32768
    assert [row["trainer/global_step"] for row in rows] == list(range(3000))
    assert rows[2999]["train/loss"] == 1.0 / 3000 and rows[96]["note"] == "x" * 96


# --- A tracker's bad URI, project or folder: one line and a failed record -------------------------

def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD_TRACKERS = [
    ("mlflow", "logger.mlflow.tracking_uri=bogus://x",
     "logger.mlflow.tracking_uri=bogus://x is not a store MLflow knows (scheme bogus://): name a running MLflow "
     "server (http://<host>:5000) or a database (sqlite:///<path>/mlflow.db), or leave "
     "logger.mlflow.tracking_uri=null for sqlite:///"),
    ("mlflow", "logger.mlflow.tracking_uri=http://127.0.0.1:{port}",
     "logger.mlflow.tracking_uri=http://127.0.0.1:{port} cannot be opened or reached ("),
    ("mlflow", "logger.mlflow.tracking_uri=sqlite:///{file}/mlflow.db",
     "logger.mlflow.tracking_uri=sqlite:///{file}/mlflow.db is a database whose folder cannot be created ({file} is "
     "a file)"),
    ("wandb", "logger.wandb.project=team/vitlab",
     "logger.wandb.project='team/vitlab' is not a W&B project name: use at most 128 characters and none of /"),
    ("wandb", "+logger.wandb.mode=sometimes", "logger.wandb.mode='sometimes' is not a W&B mode: use one of online"),
    ("wandb", "logger.wandb.offline=false",
     "logger.wandb.offline=false logs live to W&B, but no W&B API key is configured: run `wandb login`"),
    ("wandb", "logger.wandb.save_dir={file}/w",
     "logger.wandb.save_dir={file}/w cannot be created ({file} is a file): name a folder you can write to"),
    ("tensorboard", "logger.tensorboard.save_dir={file}/tb",
     "logger.tensorboard.save_dir={file}/tb cannot be created ({file} is a file): name a folder you can write to"),
    ("csv", "logger.csv.save_dir={file}/csv",
     "logger.csv.save_dir={file}/csv cannot be created ({file} is a file): name a folder you can write to"),
]


@pytest.mark.parametrize("logger, override, message", BAD_TRACKERS,
                         ids=[override.split("=")[0].lstrip("+") for _, override, _ in BAD_TRACKERS])
def test_a_bad_tracker_uri_project_or_folder_gives_one_line_and_a_failed_record(
        logger, override, message, tmp_path, data_dir, monkeypatch, capsys):
    if logger in ("mlflow", "wandb"):
        pytest.importorskip(logger)
    # No W&B key on this machine, whatever the one running the tests has.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    values = {"file": a_file, "port": closed_port()}
    result = run_in_process(train_main, "vitlab.train", [f"logger={logger}", override.format(**values), "name=bad",
                                                         *SLICE], cwd=tmp_path, data_dir=data_dir,
                            monkeypatch=monkeypatch, capsys=capsys)
    assert_short_failure(result, f"error: ValueError: {message.format(**values)}")
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "\n" not in line
    record = json.loads((tmp_path / "outputs" / "runs" / "bad" / "metrics.json").read_text())
    assert record["status"] == "failed" and record["error"] == line.removeprefix("error: ")
    assert "global_step" not in record, "stopped before training"


def test_a_run_killed_before_its_first_checkpoint_does_not_stay_running_in_mlflow(
        tmp_path, data_dir, monkeypatch, capsys):
    """SIGKILL in the first epoch leaves metrics.json naming a RUNNING MLflow run and no
    checkpoint: the re-run trains from scratch in a new MLflow run and ends the old one KILLED."""
    mlflow = pytest.importorskip("mlflow")
    from vitlab.rundir import write_json

    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    (tmp_path / "outputs" / "runs" / "r").mkdir(parents=True)
    client = mlflow.MlflowClient(uri)
    artifacts = (tmp_path / "outputs" / "mlartifacts").as_uri()
    killed = client.create_run(client.create_experiment("runs", artifact_location=artifacts)).info.run_id
    write_json(tmp_path / "outputs" / "runs" / "r" / "metrics.json",
               {"status": "running", "history": [], "tracking": {"mlflow": {"tracking_uri": uri, "run_id": killed}}})
    result = run_in_process(train_main, "vitlab.train", ["logger=mlflow", "name=r", *SLICE, "trainer.max_epochs=1"],
                            cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "outputs" / "runs" / "r" / "metrics.json").read_text())
    new = record["tracking"]["mlflow"]["run_id"]
    assert record["status"] == "completed" and new != killed
    old = client.get_run(killed)
    assert old.info.status == "KILLED" and old.data.tags["status"] == "interrupted"
    assert "restarted_as_new_run" in old.data.tags
    assert client.get_run(new).info.status == "FINISHED"
