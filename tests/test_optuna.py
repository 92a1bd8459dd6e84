"""The Optuna search's study in SQLite: continued on re-run, shared by processes, failures kept."""

import json
import os
import socket
import subprocess
import sys

import optuna
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.trial import TrialState

from conftest import SLICE, run_entry
from hydra_plugins.vitlab_optuna.optuna_sweeper import outcome, search_space

from vitlab.results import job_dirs

SEARCH = ("hparams_search=optuna", *SLICE, "trainer.max_epochs=1")


def load(sweep):
    return optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{sweep / 'optuna.db'}")


def states(study):
    return [t.state for t in study.get_trials()]


def test_rerun_continues_the_study_and_resumes_an_interrupted_trial(tmp_path, data_dir):
    run = lambda n: run_entry("vitlab.train", *SEARCH, f"hydra.sweeper.n_trials={n}", "sweep=search",
                              cwd=tmp_path, data_dir=data_dir)
    sweep = tmp_path / "outputs" / "multirun" / "search"
    run(3)
    assert states(load(sweep)) == [TrialState.COMPLETE] * 3
    assert [job.name.split("_")[0] for job in job_dirs(sweep)] == ["0", "1", "2"]

    assert "started" not in run(3).stdout, "the study has its 3 trials: nothing runs again"
    assert len(load(sweep).get_trials()) == 3

    # A trial left running by a process of this machine that was killed is run again, under its number.
    study = load(sweep)
    space, _ = search_space(["optimizer.lr=tag(log, interval(1e-4, 3e-3))", "model.patch_size=choice(4, 7)"])
    trial = study.ask(space)
    dead = subprocess.Popen(["true"])
    dead.wait()
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", dead.pid)
    result = run(4)
    assert result.stdout.count(" started") == 1
    study = load(sweep)
    assert states(study) == [TrialState.COMPLETE] * 4, "n_trials is the study's total: one more, the interrupted one"
    assert study.trials[3].params == trial.params
    assert len(job_dirs(sweep)) == 4 and job_dirs(sweep)[3].name.startswith("3_")


def test_two_processes_share_one_study(tmp_path, data_dir):
    env = {**os.environ, "VITLAB_DATA_DIR": str(data_dir)}
    command = [sys.executable, "-m", "vitlab.train", *SEARCH, "hydra.sweeper.n_trials=4", "sweep=shared"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    sweep = tmp_path / "outputs" / "multirun" / "shared"
    study = load(sweep)
    assert states(study) == [TrialState.COMPLETE] * 4
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert sorted(job.name.split("_")[0] for job in job_dirs(sweep)) == ["0", "1", "2", "3"], "one folder per trial"
    assert sum(out.count(" started") for out in outputs) == 4, "each trial runs once"


def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path, data_dir):
    result = run_entry("vitlab.train", *SEARCH, "model.patch_size=5", "hydra.sweeper.n_trials=2", "sweep=failing",
                       cwd=tmp_path, data_dir=data_dir, check=False)
    assert result.returncode == 1 and "2 of 2 jobs failed" in result.stderr
    study = load(tmp_path / "outputs" / "multirun" / "failing")
    assert states(study) == [TrialState.FAIL] * 2
    assert all("does not divide" in t.user_attrs["fail_reason"] for t in study.trials)


def test_a_job_s_outcome_is_its_trial_state(tmp_path):
    hydra_cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}})
    job = lambda value, status=JobStatus.COMPLETED: JobReturn(hydra_cfg=hydra_cfg, status=status, _return_value=value)
    assert outcome(job(0.5)) == (TrialState.COMPLETE, 0.5, None)
    assert outcome(job(ValueError("bad"), JobStatus.FAILED)) == (TrialState.FAIL, None, "ValueError: bad")
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "failed", "error": "out of memory"}))
    assert outcome(job(None)) == (TrialState.FAIL, None, "out of memory")
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "pruned"}))
    assert outcome(job(None)) == (TrialState.PRUNED, None, None)
