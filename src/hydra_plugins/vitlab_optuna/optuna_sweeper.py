"""An Optuna search whose study lives in a database: a re-run continues it, several processes
share it.

The study is ``sqlite:///<sweep folder>/optuna.db`` unless ``storage`` names another (e.g.
``postgresql://...`` for jobs on many nodes), and is named after the sweep folder. Trials are
asked and told (no ``study.optimize``): a process asks for trials while the study's finished
(complete, failed, pruned) and running trials are fewer than ``n_trials``, so ``n_trials`` is the
study's total, however many processes or re-runs share it. A job's ``hydra.job.num`` is its trial
number, so no two processes write the same job folder. A trial left running by a process of this
machine that has since died (a killed search) is launched again with its parameters, into its
own folder, where the job resumes from its last checkpoint.

The search space is written as for Hydra's own Optuna sweeper, in ``params`` or on the command
line: ``interval(a, b)`` (``tag(log, interval(a, b))`` on a log scale) is a float, ``choice(...)``
and ``range(...)`` are categorical; any other override is fixed for every trial.

Each job is composed with ``optuna.storage``, ``optuna.study`` and ``optuna.trial`` (its trial),
and with ``pruner`` set (``median``, ``successive_halving``, ``hyperband``: Optuna's pruners,
``pruner_args.<name>`` their keyword arguments) with ``optuna.pruner`` and ``optuna.pruner_args``:
the job reports to its trial after every validation and stops when the pruner says so
(``vitlab.search``); the trial is then told PRUNED.
"""

import os
import random
import socket
import time
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

# Optuna is imported where a sweep needs it: Hydra imports this module at every start.


@dataclass
class VitlabOptunaConf:
    _target_: str = "hydra_plugins.vitlab_optuna.optuna_sweeper.VitlabOptunaSweeper"
    direction: str = "minimize"
    #: The study's total of finished trials (complete, failed or pruned).
    n_trials: int = 20
    #: Trials asked and launched together (the launcher may run them side by side).
    n_jobs: int = 1
    #: An Optuna storage URL; null is ``sqlite:///<sweep folder>/optuna.db``.
    storage: Optional[str] = None
    #: null is the sweep folder's name.
    study_name: Optional[str] = None
    #: An Optuna sampler (``_target_: optuna.samplers.TPESampler``); null is Optuna's default.
    sampler: Any = None
    #: Stop hopeless trials early: null | median | successive_halving | hyperband (Optuna's pruners).
    pruner: Optional[str] = None
    #: Each pruner's keyword arguments, by name (conf/hparams_search/optuna.yaml lists Optuna's
    #: defaults: ``hydra.sweeper.pruner_args.median.n_warmup_steps=1``); steps are epochs.
    pruner_args: Dict[str, Any] = field(default_factory=dict)
    params: Dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="vitlab_optuna", node=VitlabOptunaConf, provider="vitlab")


def search_space(overrides: List[str]) -> tuple[dict, list[str]]:
    """Optuna distributions of the sweep overrides, by key, and the other overrides as written
    (a later override of a key wins, so the command line narrows ``params``)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    space, fixed = {}, {}
    for text, override in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if not override.is_sweep_override():
            fixed[key] = text
        elif override.is_interval_sweep():
            value = override.value()
            space[key] = FloatDistribution(value.start, value.end, log="log" in value.tags)
        else:
            space[key] = CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    return space, list(fixed.values())


def outcome(ret: JobReturn) -> tuple[Any, Optional[float], Optional[str]]:
    """A job's trial state, value and failure reason: failed when it raised or returned no number
    (a vitlab job that failed returns None), pruned when its metrics.json says so."""
    from optuna.trial import TrialState

    from vitlab.rundir import read_metrics

    try:
        value = ret.return_value  # raises the job's exception
    except Exception as error:  # noqa: BLE001 - any failure of a job is the trial's
        return TrialState.FAIL, None, f"{type(error).__name__}: {error}"
    metrics = read_metrics(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg else {}
    if metrics.get("status") == "pruned":
        return TrialState.PRUNED, None, None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return TrialState.FAIL, None, metrics.get("error") or f"the job returned {value!r}, not a number"
    return TrialState.COMPLETE, float(value), None


def interrupted(trial) -> bool:
    """Whether a running trial's process, on this machine, has ended."""
    if trial.user_attrs.get("host") != socket.gethostname():
        return False
    try:
        os.kill(trial.user_attrs["pid"], 0)
    except ProcessLookupError:
        return True
    except (KeyError, PermissionError):
        pass
    return False


class VitlabOptunaSweeper(Sweeper):
    def __init__(self, direction: str, n_trials: int, n_jobs: int, storage: Optional[str], study_name: Optional[str],
                 sampler: Any, params: Dict[str, str], pruner: Optional[str] = None,
                 pruner_args: Optional[Dict[str, Any]] = None) -> None:
        from vitlab.search import make_pruner

        self.direction, self.n_trials, self.n_jobs = direction, n_trials, max(1, n_jobs)
        self.storage, self.study_name, self.sampler, self.params = storage, study_name, sampler, dict(params or {})
        # A bad name or argument stops the search here, before any trial, with one line.
        self.pruner, self.pruner_args = pruner, dict((pruner_args or {}).get(pruner) or {}) if pruner else {}
        make_pruner(pruner, self.pruner_args)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir).absolute()
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    @property
    def url(self) -> str:
        return self.storage or f"sqlite:///{self.sweep_dir / 'optuna.db'}"

    def study(self):
        import optuna
        from sqlalchemy.exc import SQLAlchemyError

        from vitlab.search import storage

        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:
                return optuna.create_study(
                    storage=storage(self.url), sampler=self.sampler, study_name=self.study_name or self.sweep_dir.name,
                    direction=self.direction, load_if_exists=True,
                )
            except SQLAlchemyError:  # processes started together create the tables at once: one wins
                if attempt == 2:
                    raise
                time.sleep(1 + random.random())

    def trial_overrides(self, study, trial) -> list[str]:
        """What tells a job which trial it is (and its pruner): ``optuna.*`` fields of its config."""
        quoted = lambda text: "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"
        overrides = [f"optuna.storage={quoted(self.url)}", f"optuna.study={quoted(study.study_name)}",
                     f"optuna.trial={trial.number}"]
        if self.pruner:
            overrides.append(f"optuna.pruner={self.pruner}")
            overrides += [f"++optuna.pruner_args.{key}={quoted(value) if isinstance(value, str) else value}"
                          for key, value in self.pruner_args.items()]
        return overrides

    def ask(self, study, space: dict) -> list:
        """Trials to launch now: the interrupted ones of this machine, else up to ``n_jobs`` new
        ones while finished and running trials are fewer than ``n_trials``."""
        from optuna.trial import TrialState

        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if stale := [t for t in running if interrupted(t)]:
            return stale[: self.n_jobs]
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
        trials = []
        for _ in range(min(self.n_jobs, self.n_trials - len(finished) - len(running))):
            trial = study.ask(space)
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            trials.append(trial)
        return trials

    def launch(self, study, trials: list, fixed: list[str]) -> None:
        """Run trials of consecutive numbers as jobs of those numbers, and tell their outcomes."""
        from optuna.trial import Trial

        overrides = [(*(f"{key}={value}" for key, value in t.params.items()), *fixed, *self.trial_overrides(study, t))
                     for t in trials]
        for state, value, reason in map(outcome, self.launcher.launch(overrides, initial_job_idx=trials[0].number)):
            trial = trials.pop(0)
            if reason and isinstance(trial, Trial):  # a relaunched trial's reason is in its metrics.json
                trial.set_user_attr("fail_reason", reason)
            study.tell(trial.number, value, state=state)

    def sweep(self, arguments: List[str]) -> None:
        space, fixed = search_space([*(f"{key}={value}" for key, value in self.params.items()), *arguments])
        study = self.study()
        # A sampler that runs out of trials (GridSampler, BruteForceSampler: every combination
        # tried) calls study.stop(), which Optuna allows only inside study.optimize; trials here
        # are asked and told, so the call ends the asking instead.
        exhausted = []
        study.stop = lambda: exhausted.append(True)
        while not exhausted and (trials := self.ask(study, space)):
            for _, run in groupby(enumerate(trials), lambda it: it[1].number - it[0]):
                self.launch(study, [trial for _, trial in run], fixed)
        self.write_results(study)

    def write_results(self, study) -> None:
        """``optimization_results.yaml``: the study's trials by state and its best trial."""
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        results: dict = {"study_name": study.study_name, "trials": {s: states.count(s) for s in sorted(set(states))}}
        if "COMPLETE" in states:
            results |= {"best_trial": study.best_trial.number, "best_value": study.best_value, "best_params": study.best_params}
        (self.sweep_dir / "optimization_results.yaml").write_text(yaml.safe_dump(results, sort_keys=False))
