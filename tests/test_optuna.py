"""The Optuna search's study in SQLite: continued on re-run, shared by processes, failures kept."""

import json
import os
import socket
import subprocess
import sys

import optuna
import pytest
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


PRUNE = ("trainer.max_epochs=2", "hydra.sweeper.pruner=median", "hydra.sweeper.pruner_args.median.n_startup_trials=1", "sweep=pruning")


def test_trials_behind_the_median_are_pruned_across_processes_and_not_rerun(tmp_path, data_dir):
    sweep = tmp_path / "outputs" / "multirun" / "pruning"
    # One process completes a trial that learns; two more, side by side, share the study with
    # trials that cannot learn (lr 1e-7): each is pruned against the first process's values.
    run_entry("vitlab.train", *SEARCH, *PRUNE, "optimizer.lr=0.003", "hydra.sweeper.n_trials=1",
              cwd=tmp_path, data_dir=data_dir)
    env = {**os.environ, "VITLAB_DATA_DIR": str(data_dir)}
    env.pop("VITLAB_OUTPUT_DIR", None)
    command = [sys.executable, "-m", "vitlab.train", *SEARCH, *PRUNE, "optimizer.lr=1e-7", "hydra.sweeper.n_trials=3"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "pruned trials are no failure: " + outputs[0][-3000:]
    study = load(sweep)
    assert states(study) == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert all(list(t.intermediate_values) == [1] for t in study.trials[1:]), "reported after epoch 1, stopped there"
    assert list(study.trials[0].intermediate_values) == [1, 2]
    for job in job_dirs(sweep)[1:]:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "pruned" and metrics["pruned_at_epoch"] == 1 and len(metrics["history"]) == 1
        assert "test/acc" not in metrics and (job / "checkpoints" / "last.ckpt").is_file()
        config = OmegaConf.load(job / "config.yaml").optuna
        assert config.trial == int(job.name.split("_")[0]) and config.pruner == "median"
        assert config.pruner_args.n_startup_trials == 1 and config.study == "pruning"
    summary = (sweep / "summary.md").read_text()
    assert "3 jobs: 1 completed, 2 pruned" in summary and "optuna.trial" not in summary
    assert "PRUNED: 2" in (sweep / "optimization_results.yaml").read_text()

    # A re-run neither runs nor counts the pruned trials again.
    again = run_entry("vitlab.train", *SEARCH, *PRUNE, "optimizer.lr=1e-7", "hydra.sweeper.n_trials=3",
                      cwd=tmp_path, data_dir=data_dir)
    assert "started" not in again.stdout and len(load(sweep).trials) == 3


def test_pruner_settings_are_checked_before_any_trial():
    from hydra_plugins.vitlab_optuna.optuna_sweeper import VitlabOptunaSweeper

    from vitlab.search import make_pruner

    assert type(make_pruner("hyperband", {"min_resource": 1})).__name__ == "HyperbandPruner"
    assert type(make_pruner(None)).__name__ == "NopPruner"
    with pytest.raises(ValueError, match=r"hydra.sweeper.pruner='medain' is not a pruner: choose one of median"):
        VitlabOptunaSweeper("maximize", 4, 1, None, None, None, {}, pruner="medain")
    with pytest.raises(ValueError, match=r"pruner_args=\{'n_warmup': 1\} do not fit hydra.sweeper.pruner=median"):
        VitlabOptunaSweeper("maximize", 4, 1, None, None, None, {}, pruner="median",
                            pruner_args={"median": {"n_warmup": 1}})


def test_a_trial_s_job_is_told_its_trial_in_its_config(tmp_path):
    """The overrides that tell a job its trial parse back to the same values, whatever the path."""
    from types import SimpleNamespace

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.vitlab_optuna.optuna_sweeper import VitlabOptunaSweeper

    sweeper = VitlabOptunaSweeper("maximize", 4, 1, None, None, None, {}, pruner="successive_halving",
                                  pruner_args={"successive_halving": {"min_resource": "auto", "reduction_factor": 3}})
    sweeper.sweep_dir = tmp_path / "it's a, folder=x"
    overrides = sweeper.trial_overrides(SimpleNamespace(study_name="it's"), SimpleNamespace(number=7))
    parsed = {o.get_key_element(): o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    assert parsed == {"optuna.storage": f"sqlite:///{sweeper.sweep_dir}/optuna.db", "optuna.study": "it's",
                      "optuna.trial": 7, "optuna.pruner": "successive_halving",
                      "++optuna.pruner_args.min_resource": "auto", "++optuna.pruner_args.reduction_factor": 3}


def test_a_run_outside_a_search_is_never_pruned(caplog):
    from vitlab.search import search_callbacks

    assert search_callbacks(OmegaConf.create({"trial": None, "pruner": None})) == []
    with caplog.at_level("WARNING"):
        assert search_callbacks(OmegaConf.create({"trial": None, "pruner": "median"})) == []
    assert "optuna.pruner=median does nothing here" in caplog.text
    with pytest.raises(ValueError, match="optuna.trial=3 needs optuna.storage too"):
        search_callbacks(OmegaConf.create({"trial": 3, "storage": None, "study": "s"}))


def test_a_grid_sampler_ends_the_search_when_every_combination_ran(tmp_path):
    """GridSampler/BruteForceSampler stop the study when the grid is done: the search ends there,
    under n_trials, instead of failing (Optuna allows study.stop() only inside study.optimize)."""
    from hydra_plugins.vitlab_optuna.optuna_sweeper import VitlabOptunaSweeper

    launched = []

    class Launcher:
        def launch(self, overrides, initial_job_idx):
            launched.extend(overrides)
            cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path / "none")}}})
            return [JobReturn(hydra_cfg=cfg, status=JobStatus.COMPLETED, _return_value=0.5) for _ in overrides]

    sweeper = VitlabOptunaSweeper("maximize", 10, 1, None, None, optuna.samplers.BruteForceSampler(seed=0),
                                  {"optimizer.lr": "choice(0.1, 0.01, 0.001)"})
    sweeper.sweep_dir, sweeper.launcher = tmp_path / "grid", Launcher()
    sweeper.sweep(["seed=0"])
    study = load(tmp_path / "grid")
    assert states(study) == [TrialState.COMPLETE] * 3
    assert sorted(t.params["optimizer.lr"] for t in study.trials) == [0.001, 0.01, 0.1]
    assert [o[-1] for o in launched] == ["optuna.trial=0", "optuna.trial=1", "optuna.trial=2"]
    assert all("seed=0" in o for o in launched)
