"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases, through Lightning's own
``MLFlowLogger`` and ``WandbLogger`` (``logger=mlflow``, ``logger=wandb``, ``logger=many``).

Each tracker is an optional extra, imported only when its logger is chosen. A sweep is one
MLflow experiment (one W&B group) named after the sweep, with a run per job named after the
job's folder. Lightning sends the metrics, under the TensorBoard keys; what it does not send
is added here: the flattened config as parameters, the sweep, its swept keys and the run's
status as tags, the record's files as artifacts, and a failed run's status with its reason.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

#: The record's files each tracked run keeps (``curves.png`` only once a run completed).
ARTIFACTS = ("config.yaml", "metrics.json", "curves.png")
#: What ``vitlab.eval`` adds to the run of the checkpoint it evaluated, under ``eval/``.
EVAL_ARTIFACTS = ("confusion_matrix.png", "confusion_matrix.csv", "per_class_accuracy.csv")
#: The record's status -> MLflow's run status.
MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def require(package: str) -> None:
    """Refuse a tracker whose package is missing, naming the extra that installs it."""
    if importlib.util.find_spec(package) is None:
        raise ValueError(f'logger={package} needs the {package} package: pip install -e ".[{package}]"')


def _below(path: str | Path, root: Path) -> str:
    """``path`` relative to ``root`` (``<date>/<time>``, a name), or its last part if outside."""
    path = Path(path).resolve()
    return str(path.relative_to(root.resolve())) if path.is_relative_to(root.resolve()) else path.name


def run_context(root: str, run_dir: str) -> dict[str, Any]:
    """Where this run belongs: ``sweep`` (the multirun's folder below ``<root>/multirun/``, None
    for a single run), ``run`` (the job's folder, or the run's below ``<root>/runs/``) and
    ``swept_keys`` (the keys the sweep varies, from Hydra's record of the multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra is None or hydra.mode != RunMode.MULTIRUN:
        return {"sweep": None, "run": _below(run_dir, Path(root) / "runs"), "swept_keys": []}
    from vitlab.results import sweep_overrides, swept_keys

    params = hydra.sweeper.get("params")
    keys = swept_keys(sweep_overrides(Path(hydra.sweep.dir)), OmegaConf.to_container(params) if params else None)
    return {"sweep": _below(hydra.sweep.dir, Path(root) / "multirun"), "run": Path(run_dir).name, "swept_keys": keys}


def mlflow_logger(root: str, run_dir: str, tracking_uri: str | None = None, experiment_name: str | None = None,
                  **options: Any) -> MLFlowLogger:
    """Lightning's MLFlowLogger for this run: a SQLite database ``<root>/mlflow.db`` with the
    artifacts in ``<root>/mlartifacts/``, unless ``tracking_uri`` names another store (a team
    server); the experiment is the sweep's (``runs`` for single runs) unless named."""
    require("mlflow")
    where = run_context(root, run_dir)
    artifacts = None
    if not tracking_uri:
        tracking_uri = f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
        artifacts = (Path(root).resolve() / "mlartifacts").as_uri()
        Path(root).mkdir(parents=True, exist_ok=True)
    tags = {"sweep": where["sweep"] or "", "swept_keys": ",".join(where["swept_keys"]), "status": "running",
            "run_dir": str(Path(run_dir).resolve())}
    return MLFlowLogger(experiment_name=experiment_name or where["sweep"] or "runs", run_name=where["run"],
                        tracking_uri=tracking_uri, artifact_location=artifacts, tags=tags, **options)


def wandb_logger(root: str, run_dir: str, project: str = "vitlab", offline: bool = True, **options: Any) -> WandbLogger:
    """Lightning's WandbLogger for this run, writing to ``<run_dir>/wandb/`` (offline unless
    ``offline=false``: ``wandb sync`` uploads it later); a sweep's jobs form one W&B group."""
    require("wandb")
    where = run_context(root, run_dir)
    return WandbLogger(name=where["run"], group=where["sweep"], project=project, offline=offline, save_dir=run_dir,
                       config={"swept_keys": where["swept_keys"]}, **options)


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as ``{"model.patch_size": 4, ...}``, the keys an override names."""

    def flatten(node: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(node, dict) or not node:
            return {prefix[:-1]: node}
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}

    return flatten(OmegaConf.to_container(cfg, resolve=True), "")


def trackers(loggers: list) -> list:
    return [lg for lg in loggers if isinstance(lg, (MLFlowLogger, WandbLogger))]


def run_started(loggers: list, cfg: DictConfig) -> None:
    """Called once a training run's trainer is set up (rank 0): the flattened config goes to
    every tracker as its parameters."""
    if chosen := trackers(loggers):
        params = flat_config(cfg)
        for logger in chosen:
            logger.log_hyperparams(params)


def run_ended(loggers: list, run_dir: Path, record: dict[str, Any]) -> None:
    """Called when a training run's record is closed (rank 0), with its final ``metrics.json``:
    the status and reason as tags (MLflow) or summary (W&B), the record's files as artifacts,
    and the run ended as the record says."""
    status, error = record.get("status", "failed"), record.get("error", "")
    files = [Path(run_dir) / name for name in ARTIFACTS if (Path(run_dir) / name).is_file()]
    for logger in trackers(loggers):
        if isinstance(logger, MLFlowLogger):
            client, run_id = logger.experiment, logger.run_id
            client.set_tag(run_id, "status", status)
            if error:
                client.set_tag(run_id, "error", error)
            for path in files:
                client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, MLFLOW_STATUS.get(status, "FAILED"))
        else:
            import wandb

            run = logger.experiment
            run.summary.update({"status": status, **({"error": error} if error else {})})
            record_files = wandb.Artifact(f"record-{run.id}", type="run-record")
            for path in files:
                record_files.add_file(str(path))
            run.log_artifact(record_files)
            # Finished here, so that the next job of a sweep in this process starts its own run.
            run.finish(exit_code=0 if status == "completed" else 1)


def run_ids(loggers: list) -> dict[str, Any]:
    """Where the run is tracked, for the checkpoint's run description: ``{"mlflow":
    {"tracking_uri": ..., "run_id": ...}}``, empty without MLflow."""
    mlflow = next((lg for lg in loggers if isinstance(lg, MLFlowLogger)), None)
    if mlflow is None or mlflow.run_id is None:
        return {}
    return {"mlflow": {"tracking_uri": mlflow.experiment.tracking_uri, "run_id": mlflow.run_id}}


def eval_ended(tracked: dict[str, Any] | None, out: Path) -> None:
    """``vitlab.eval``: add the confusion matrix (and per-class accuracy) to the MLflow run of
    the evaluated checkpoint, under ``eval/``. A run that cannot be reached is only a warning:
    the eval's own folder has the files."""
    run = (tracked or {}).get("mlflow")
    if not run:
        return
    uri, run_id = run["tracking_uri"], run["run_id"]
    if importlib.util.find_spec("mlflow") is None:
        why = 'the mlflow package is missing: pip install -e ".[mlflow]"'
    elif uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        why = f"{uri} is not on this machine"  # MLflow would create an empty database there
    else:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(uri)
        try:
            for name in EVAL_ARTIFACTS:
                if (out / name).is_file():
                    client.log_artifact(run_id, str(out / name), artifact_path="eval")
            return
        except MlflowException as error:
            why = str(error).splitlines()[0]
    log.warning(f"the confusion matrix was not added to MLflow run {run_id}: {why}")
