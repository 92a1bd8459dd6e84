"""A training run as a trial of an Optuna study: intermediate values reported after every
validation, and pruning.

vitlab's Optuna sweeper (``hparams_search=optuna``) composes each job with ``optuna.storage``,
``optuna.study`` and ``optuna.trial`` (and ``optuna.pruner``/``optuna.pruner_args`` when its
``hydra.sweeper.pruner`` is set), so the job's own ``config.yaml`` says which trial it is. The
job opens that trial in the study's storage (the database every process of the search shares),
reports ``optuna.report`` (a logged metric, ``val/acc`` by default) at each validation with the
number of epochs done as the step, and, when the pruner says so, stops after that epoch: its
record says ``status: pruned`` and ``pruned_at_epoch``, its checkpoints stay, and the sweeper
tells the study the trial was pruned. Several processes sharing the study prune against each
other's values, since the pruner reads them from the storage.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

#: ``hydra.sweeper.pruner`` names -> Optuna's pruners (their keyword arguments: ``pruner_args``).
PRUNERS = {"median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner"}


def make_pruner(name: str | None, args: dict | None = None, field: str = "hydra.sweeper.pruner"):
    """The Optuna pruner of this name built with ``args`` (``NopPruner`` for null), or a one-line
    ``ValueError`` naming the field, the value and the choices."""
    import optuna

    args = dict(args or {})
    if name is None:
        if args:
            raise ValueError(f"{field}_args={args} without a pruner: set {field} to one of {', '.join(PRUNERS)}.")
        return optuna.pruners.NopPruner()
    if name not in PRUNERS:
        raise ValueError(f"{field}={name!r} is not a pruner: choose one of {', '.join(PRUNERS)} (or null for none).")
    cls = getattr(optuna.pruners, PRUNERS[name])
    try:
        return cls(**args)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{field}_args={args} do not fit {field}={name} (optuna.pruners.{cls.__name__}): "
                         f"{str(error).splitlines()[0]}") from None


def storage(url: str):
    """The study's storage; SQLite lets one process write at a time, so the others wait for it
    (60 s) instead of failing. (The sweeper, which creates the tables, retries a lost race.)"""
    import optuna

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


class OptunaTrial(L.Callback):
    """Reports ``report`` to trial number ``trial`` of ``study`` after each validation (rank 0,
    steps = epochs done) and stops training when ``pruner`` prunes it (``pruned_at`` is then the
    epoch). A step the trial already holds (a resumed run repeating an epoch) is not reported
    again."""

    def __init__(self, storage: str, study: str, trial: int, pruner: str | None = None,
                 pruner_args: dict | None = None, report: str = "val/acc") -> None:
        self.url, self.study_name, self.number, self.report = storage, study, int(trial), report
        self.pruner_name = pruner
        self.pruner = make_pruner(pruner, pruner_args, field="optuna.pruner")
        self.trial = None
        self.pruned_at: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self.trial is not None:
            return
        import optuna

        store = storage(self.url)
        try:
            study = optuna.load_study(study_name=self.study_name, storage=store, pruner=self.pruner)
            trial_id = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(self.study_name),
                                                                     self.number)
        except KeyError as error:
            raise ValueError(f"optuna.trial={self.number} of optuna.study={self.study_name} is not in "
                             f"optuna.storage={self.url} ({error}): these fields are set by the Optuna sweeper "
                             f"(hparams_search=optuna); leave them null in a run of your own.") from None
        self.store, self.trial_id = store, trial_id
        self.trial = optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero and self.trial is not None:
            prune = self._report(trainer)
        if trainer.world_size > 1:
            prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            self.pruned_at = trainer.current_epoch + 1
            trainer.should_stop = True

    def _report(self, trainer: L.Trainer) -> bool:
        from optuna.trial import TrialState

        if self.report not in trainer.callback_metrics:
            logged = ", ".join(sorted(k for k in trainer.callback_metrics if k.startswith("val/")))
            raise ValueError(f"optuna.report={self.report!r} is not a logged metric: choose one of {logged}.")
        frozen = self.store.get_trial(self.trial_id)
        if frozen.state != TrialState.RUNNING:  # told already (a trial re-run by hand): nothing to report to
            return False
        step, value = trainer.current_epoch + 1, float(trainer.callback_metrics[self.report])
        if step not in frozen.intermediate_values:
            self.trial.report(value, step)
        if not self.trial.should_prune():
            return False
        log.info(f"trial {self.number} pruned after epoch {step} by the {self.pruner_name} pruner "
                 f"({self.report}={value:.4f})")
        return True


def search_callbacks(options) -> list[OptunaTrial]:
    """The trial callback of a job of an Optuna search (``optuna.trial`` set), else none."""
    if not options or options.get("trial") is None:
        if options and options.get("pruner"):
            log.warning(f"optuna.pruner={options.pruner} does nothing here: pruning needs a study, the Optuna "
                        f"search's (hparams_search=optuna hydra.sweeper.pruner={options.pruner}); a grid sweep "
                        f"(-m) or a single run is never pruned.")
        return []
    missing = [key for key in ("storage", "study") if not options.get(key)]
    if missing:
        raise ValueError(f"optuna.trial={options.trial} needs optuna.{missing[0]} too: these fields are set by the "
                         f"Optuna sweeper (hparams_search=optuna); leave them null in a run of your own.")
    args: dict[str, Any] = dict(options.get("pruner_args") or {})
    return [OptunaTrial(options.storage, options.study, options.trial, options.get("pruner"), args,
                        options.get("report") or "val/acc")]
