"""Fault-tolerant, resumable multiruns and runs."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, read_write

from conftest import SLICE, run_entry
from test_configs import compose_train

from vitlab.results import identical_run, job_dirs
from vitlab.rundir import read_metrics
from vitlab.sweep import SweepCallback, sweep_job


def job_metrics(sweep):
    return {job.name: read_metrics(job) for job in job_dirs(sweep)}


def test_swept_keys_reach_the_jobs_through_a_hydra_override_not_the_environment(tmp_path):
    """The parent's callback adds ``hydra.sweep.subdir`` with the swept keys as an argument;
    Hydra composes each job from the parent's Hydra overrides plus the job's own, as here."""
    cfg = compose_train(tmp=tmp_path)
    with read_write(cfg.hydra.overrides):
        cfg.hydra.overrides.task = ["model.patch_size=4,7", "seed=0,1", "trainer.max_epochs=1"]
    environ, callback = dict(os.environ), SweepCallback()
    callback.on_multirun_start(cfg)
    assert dict(os.environ) == environ, "nothing is passed through the environment"
    assert (callback.keys, callback.jobs) == (["model.patch_size", "seed"], 4)
    added = OmegaConf.to_container(cfg.hydra.overrides.hydra)[-1]  # unresolved, as Hydra reads it
    job = compose_train(added, "model.patch_size=7", "seed=1", "trainer.max_epochs=1")
    with read_write(job.hydra.job):
        job.hydra.job.num = 3
    assert job.hydra.sweep.subdir == "3_model.patch_size=7,seed=1"
    assert callback._label(job) == "job 4/4: model.patch_size=7,seed=1"

    # A subdir of the user's own is left alone.
    cfg = compose_train("hydra.sweep.subdir=${hydra.job.num}", tmp=tmp_path)
    overrides = OmegaConf.to_container(cfg.hydra.overrides.hydra)
    SweepCallback().on_multirun_start(cfg)
    assert OmegaConf.to_container(cfg.hydra.overrides.hydra) == overrides


def test_sweep_job_gives_ddp_the_job_command_and_undoes_only_the_launcher_env(tmp_path, monkeypatch):
    compose_train("seed=3", "trainer.max_epochs=1", tmp=tmp_path)
    monkeypatch.setenv("MASTER_PORT", "1234")  # set before the job: kept
    argv = list(sys.argv)
    with sweep_job(str(tmp_path / "job")):
        assert sys.argv[1:] == ["seed=3", "trainer.max_epochs=1"], "Lightning's launcher reads sys.argv[1:]"
        assert HydraConfig.get().run.dir == str(tmp_path / "job"), "... and hydra.run.dir"
        # As Lightning's launcher leaves them, and something else the job set.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", NODE_RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
        monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    assert sys.argv == argv
    assert not {"MASTER_ADDR", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"} & set(os.environ)
    assert os.environ["MASTER_PORT"] == "1234" and os.environ["PL_GLOBAL_SEED"] == "3", "no wholesale restore"


def test_failing_job_does_not_stop_the_sweep_and_rerun_skips_completed(tmp_path, data_dir):
    args = ("-m", "model.patch_size=4,5,7", *SLICE, "trainer.max_epochs=1", "sweep=ablation")
    first = run_entry("vitlab.train", *args, cwd=tmp_path, data_dir=data_dir, check=False)
    assert first.returncode != 0, "a failed job makes the multirun exit non-zero"
    sweep = tmp_path / "outputs" / "multirun" / "ablation"
    jobs = job_metrics(sweep)
    assert list(jobs) == ["0_model.patch_size=4", "1_model.patch_size=5", "2_model.patch_size=7"]
    assert [m["status"] for m in jobs.values()] == ["completed", "failed", "completed"]
    assert "model.patch_size=5 does not divide" in jobs["1_model.patch_size=5"]["error"]
    # The summary is written although a job failed, with the failure and its reason.
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model.patch_size"], r["status"]) for r in rows] == [("4", "completed"), ("5", "failed"), ("7", "completed")]
    assert "does not divide" in rows[1]["error"]
    assert "1 of 3 jobs failed" in first.stderr
    assert "job 2/3: model.patch_size=5 failed: ValueError: model.patch_size=5 does not divide" in first.stdout

    stamps = {name: os.stat(sweep / name / "checkpoints" / "last.ckpt").st_mtime_ns for name in ("0_model.patch_size=4", "2_model.patch_size=7")}
    second = run_entry("vitlab.train", *args, cwd=tmp_path, data_dir=data_dir, check=False)
    assert second.returncode != 0  # the invalid job is tried again and fails again
    assert second.stdout.count("holds a completed run: skipped") + second.stderr.count("holds a completed run: skipped") == 2
    for name, stamp in stamps.items():
        assert os.stat(sweep / name / "checkpoints" / "last.ckpt").st_mtime_ns == stamp, f"{name} was retrained"
    assert job_metrics(sweep) == jobs | {"1_model.patch_size=5": job_metrics(sweep)["1_model.patch_size=5"]}


def test_a_job_equal_to_a_completed_run_takes_its_results_with_reuse(tmp_path, data_dir):
    """reuse=<folder>: a job whose config equals a completed run's there in all that decides the
    result takes that run's metrics (marked reused_from) instead of training; the others train."""
    common = (*SLICE, "trainer.max_epochs=1")
    run_entry("vitlab.train", *common, "name=base", cwd=tmp_path, data_dir=data_dir)
    base = tmp_path / "outputs" / "runs" / "base"
    # Threads, logging and the folder differ from the base run; they do not decide the result.
    sweep_args = ("-m", "model.patch_size=4,7", *common, "sweep=other", "torch_threads=1", "logger=none",
                  f"reuse={tmp_path / 'outputs' / 'runs'}")
    result = run_entry("vitlab.train", *sweep_args, cwd=tmp_path, data_dir=data_dir)
    assert f"{base} completed the same run" in result.stdout + result.stderr
    jobs = job_metrics(tmp_path / "outputs" / "multirun" / "other")
    reused, trained = jobs["0_model.patch_size=4"], jobs["1_model.patch_size=7"]
    assert reused == read_metrics(base) | {"reused_from": "outputs/runs/base"}  # below the working folder
    assert not (tmp_path / "outputs" / "multirun" / "other" / "0_model.patch_size=4" / "checkpoints").exists()
    assert trained["status"] == "completed" and "reused_from" not in trained
    assert yaml.safe_load((tmp_path / "outputs" / "multirun" / "other" / "0_model.patch_size=4" / "config.yaml").read_text(
    ))["torch_threads"] == 1, "the job's own config is kept"


def test_reuse_of_a_folder_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reuse=.*/nowhere is not a folder: name a folder of earlier runs"):
        identical_run({"seed": 0}, tmp_path / "nowhere")


def test_run_killed_with_sigkill_resumes_from_last_checkpoint(tmp_path, data_dir):
    overrides = [*SLICE, "trainer.max_epochs=3", "trainer.limit_train_batches=150", "name=longrun"]
    run_dir = tmp_path / "outputs" / "runs" / "longrun"
    env = {**os.environ, "VITLAB_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "vitlab.train", *overrides], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    # The checkpoint appears whole (written to a temporary file, then moved): kill in epoch 2.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.is_file()
    killed = read_metrics(run_dir)
    assert killed["status"] == "running", "a killed run never looks finished"

    result = run_entry("vitlab.train", *overrides, cwd=tmp_path, data_dir=data_dir)
    assert "Restoring states from the checkpoint path at" in result.stdout + result.stderr
    assert "last.ckpt" in result.stdout + result.stderr
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed"
    assert metrics["epochs"] == 3 and metrics["global_step"] == 450


def test_ddp_jobs_in_a_multirun_keep_one_folder_each(tmp_path, data_dir):
    """Lightning restarts the script for the other DDP ranks: they must join their job, not
    start the sweep again or open new run folders."""
    result = run_entry("vitlab.train", "-m", "trainer=ddp", "seed=0,1", *SLICE, "trainer.max_epochs=1", "sweep=ddp",
                       cwd=tmp_path, data_dir=data_dir)
    sweep = tmp_path / "outputs" / "multirun" / "ddp"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_seed=0", "1_seed=1"]
    assert not (tmp_path / "outputs" / "runs").exists()
    for job in ("0_seed=0", "1_seed=1"):
        metrics = read_metrics(sweep / job)
        assert metrics["status"] == "completed"
        # limit_train_batches=8 counts per process: 8 steps of 2 x 64 images.
        assert metrics["global_step"] == 8
    assert result.stdout.count("job 1/2: seed=0 completed") == 1


def test_launchers_and_optuna_search(tmp_path, data_dir):
    """Parallel jobs (joblib), the cluster launcher's code path (through submitit's local
    executor) and the Optuna sweeper."""
    run_entry("vitlab.train", "-m", "launcher=joblib", "seed=0,1", *SLICE, "trainer.max_epochs=1", "sweep=parallel",
              cwd=tmp_path, data_dir=data_dir)
    sweep = tmp_path / "outputs" / "multirun" / "parallel"
    assert all(m["status"] == "completed" for m in job_metrics(sweep).values()) and len(job_metrics(sweep)) == 2
    # Two jobs side by side share the cores: one torch thread each on a 2-core machine.
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert f"torch_threads: {threads}" in (sweep / "0_seed=0" / "config.yaml").read_text()

    run_entry("vitlab.train", "-m", "launcher=submitit_local", "seed=0,1", *SLICE, "trainer.max_epochs=1", "sweep=slurm",
              cwd=tmp_path, data_dir=data_dir)
    jobs = job_metrics(tmp_path / "outputs" / "multirun" / "slurm")
    assert list(jobs) == ["0_seed=0", "1_seed=1"] and all(m["status"] == "completed" for m in jobs.values())

    run_entry("vitlab.train", "hparams_search=optuna", "hydra.sweeper.n_trials=3", *SLICE, "trainer.max_epochs=1",
              "sweep=search", cwd=tmp_path, data_dir=data_dir)
    sweep = tmp_path / "outputs" / "multirun" / "search"
    jobs = job_metrics(sweep)
    assert len(jobs) == 3 and all(name.split("_", 1)[1].startswith("model.depth=") for name in jobs)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(m["best_val_acc"] for m in jobs.values())
    # SLICE fixes model.depth on the command line, which takes it out of the search space.
    assert set(best["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "model.patch_size"}


def test_sigterm_saves_a_checkpoint_at_the_step_reached_and_resumes(tmp_path, data_dir):
    overrides = [*SLICE, "trainer.max_epochs=3", "trainer.limit_train_batches=150", "name=preempted"]
    run_dir = tmp_path / "outputs" / "runs" / "preempted"
    env = {**os.environ, "VITLAB_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "vitlab.train", *overrides], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # during epoch 2, as a scheduler's preemption would
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "interrupted by SIGTERM" in stderr
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "interrupted"
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 150 <= step < 450, "saved at the step reached (the kill lands in epoch 2)"

    run_entry("vitlab.train", *overrides, cwd=tmp_path, data_dir=data_dir)
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed" and metrics["global_step"] == 450
