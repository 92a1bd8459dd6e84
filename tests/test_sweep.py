"""Fault-tolerant, resumable multiruns and runs."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import SLICE, run_entry


def job_metrics(sweep):
    return {p.name: json.loads((p / "metrics.json").read_text()) for p in sorted(sweep.iterdir()) if (p / "metrics.json").is_file()}


def test_failing_job_does_not_stop_the_sweep_and_rerun_skips_completed(tmp_path, data_dir):
    args = ("-m", "model.patch_size=4,5,7", *SLICE, "trainer.max_epochs=1", "sweep=ablation")
    first = run_entry("vitlab.train", *args, cwd=tmp_path, data_dir=data_dir, check=False)
    assert first.returncode != 0, "a failed job makes the multirun exit non-zero"
    sweep = tmp_path / "outputs" / "multirun" / "ablation"
    jobs = job_metrics(sweep)
    assert list(jobs) == ["0_model.patch_size=4", "1_model.patch_size=5", "2_model.patch_size=7"]
    assert [m["status"] for m in jobs.values()] == ["completed", "failed", "completed"]
    assert "model.patch_size=5 does not divide the image size 28" in jobs["1_model.patch_size=5"]["error"]

    stamps = {name: os.stat(sweep / name / "checkpoints" / "last.ckpt").st_mtime_ns for name in ("0_model.patch_size=4", "2_model.patch_size=7")}
    second = run_entry("vitlab.train", *args, cwd=tmp_path, data_dir=data_dir, check=False)
    assert second.returncode != 0  # the invalid job is tried again and fails again
    assert second.stdout.count("holds a completed run: skipped") + second.stderr.count("holds a completed run: skipped") == 2
    for name, stamp in stamps.items():
        assert os.stat(sweep / name / "checkpoints" / "last.ckpt").st_mtime_ns == stamp, f"{name} was retrained"
    assert job_metrics(sweep) == jobs | {"1_model.patch_size=5": job_metrics(sweep)["1_model.patch_size=5"]}


def test_run_killed_with_sigkill_resumes_from_last_checkpoint(tmp_path, data_dir):
    overrides = [*SLICE, "trainer.max_epochs=4", "trainer.limit_train_batches=20", "name=longrun"]
    run_dir = tmp_path / "outputs" / "runs" / "longrun"
    env = {**os.environ, "VITLAB_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "vitlab.train", *overrides], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # let the checkpoint write finish; the kill lands in a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.is_file()
    killed = json.loads((run_dir / "metrics.json").read_text())
    assert killed["status"] == "running", "a killed run never looks finished"

    result = run_entry("vitlab.train", *overrides, cwd=tmp_path, data_dir=data_dir)
    assert "Restoring states from the checkpoint path at" in result.stdout + result.stderr
    assert "last.ckpt" in result.stdout + result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["epochs"] == 4 and metrics["global_step"] == 80
