"""The run's loggers: TensorBoard and CSV with their folders checked, and the experiment trackers
MLflow and Weights & Biases, through Lightning's own loggers (``logger=mlflow``, ``logger=wandb``,
``logger=many``).

Each tracker is an optional extra, imported only when its logger is chosen. A sweep is one
MLflow experiment (one W&B group) named after the sweep, with a run per job named after the
job's folder. Lightning sends the metrics, under the TensorBoard keys; what it does not send
is added here: the flattened config as parameters, the sweep, its swept keys and the run's
status as tags, the record's files as artifacts, and a failed run's status with its reason.

One training run is one tracker run: ``metrics.json`` names the runs (``tracking``), and a run
resumed from its folder's ``checkpoints/last.ckpt`` continues them. The steps a killed run
trained after that checkpoint are trained again after the resume; a value at a step the tracker
already holds for that metric is not sent again, so every metric keeps one value per step.

A logger that cannot be built from its config (a tracking URI MLflow cannot open or reach, a W&B
project name W&B refuses, a folder that cannot be created) stops the run with one line naming
the field, the value and the fix, before anything trains.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vitlab.errors import first_line
from vitlab.rundir import read_metrics

log = logging.getLogger(__name__)

#: The record's files each tracked run keeps (``curves.png`` only once a run completed).
ARTIFACTS = ("config.yaml", "metrics.json", "curves.png")
#: What ``vitlab.eval`` adds to the run of the checkpoint it evaluated, under ``eval/``.
EVAL_ARTIFACTS = ("confusion_matrix.png", "confusion_matrix.csv", "per_class_accuracy.csv")
#: The record's status -> MLflow's run status.
MLFLOW_STATUS = {"completed": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
#: The experiment tag MLflow's UI reads to tell model training from GenAI work: with this value
#: it opens an experiment on its runs table (without it, MLflow 3 opens its GenAI overview).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
#: Connection attempts when a tracking server is first contacted (MLflow's default of 7, with
#: backoff, takes minutes to report a server that is not there).
PROBE_RETRIES = 1
#: W&B's modes besides ``logger.wandb.offline``.
WANDB_MODES = ("online", "offline", "disabled", "shared")


def require(package: str) -> None:
    """Refuse a tracker whose package is missing, naming the extra that installs it."""
    if importlib.util.find_spec(package) is None:
        raise ValueError(f'logger={package} needs the {package} package: pip install -e ".[{package}]"')


def _in_the_way(folder: Path, error: OSError) -> str:
    """Why ``folder`` cannot be created: the file in its place, or the system's reason."""
    blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    return f"{blocker} is a file" if blocker is not None else (error.strerror or str(error)).lower()


def writable_dir(field: str, path: str | Path) -> str:
    """``path``, created if missing; a folder that cannot be created or written to is a user error
    naming ``field`` and what is in the way."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{field}={path} cannot be created ({_in_the_way(folder, error)}): name a folder you can "
                         f"write to (the default is the run folder).") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{field}={path} is not writable: name a folder you can write to (the default is the run "
                         f"folder).")
    return str(path)


def tensorboard_logger(save_dir: str, **options: Any) -> TensorBoardLogger:
    """Lightning's TensorBoardLogger, its folder checked (``logger.tensorboard.save_dir``)."""
    return TensorBoardLogger(writable_dir("logger.tensorboard.save_dir", save_dir), **options)


def csv_logger(save_dir: str, **options: Any) -> CSVLogger:
    """Lightning's CSVLogger, its folder checked (``logger.csv.save_dir``)."""
    return CSVLogger(writable_dir("logger.csv.save_dir", save_dir), **options)


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


def previous_run(run_dir: str | Path, tracker: str) -> dict[str, Any]:
    """The ``tracker`` run that ``metrics.json`` names when this run resumes from its folder's
    last checkpoint (the record keeps ``tracking`` only then), else ``{}``."""
    return dict((read_metrics(run_dir).get("tracking") or {}).get(tracker) or {})


def end_abandoned_run(previous: dict[str, Any]) -> None:
    """The MLflow run of an earlier attempt in this folder that left no checkpoint (killed in its
    first epoch) and is still RUNNING: the new attempt trains from scratch in a new MLflow run, so
    that one is ended ``KILLED`` (status ``interrupted``, tag ``restarted_as_new_run``) rather than
    left running. Never fails the run: a store that cannot be reached gets a warning."""
    run_id, uri = (previous.get("mlflow") or {}).get("run_id"), (previous.get("mlflow") or {}).get("tracking_uri")
    if not run_id or not uri:
        return
    try:
        from mlflow import MlflowClient

        with _few_retries():
            client = MlflowClient(uri)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "status", "interrupted")
                client.set_tag(run_id, "restarted_as_new_run", "killed before its first checkpoint")
                client.set_terminated(run_id, "KILLED")
    except Exception as error:  # noqa: BLE001 - the old run's state is not worth failing the new one
        log.warning(f"MLflow run {run_id} of an earlier attempt, killed before its first checkpoint, could not be "
                    f"ended ({first_line(error)}): it shows as RUNNING.")


@contextmanager
def _few_retries():
    """MLflow's HTTP requests give up after ``PROBE_RETRIES`` quick retries (MLflow reads these
    settings at every request)."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                                                   "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(PROBE_RETRIES), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
                      MLFLOW_HTTP_REQUEST_TIMEOUT="20")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _open_mlflow(tracking_uri: str, default: str):
    """An MlflowClient on ``tracking_uri``, which it has read from: a URI MLflow cannot open or
    reach is a user error naming ``logger.mlflow.tracking_uri``."""
    from mlflow import MlflowClient
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    fix = (f"name a running MLflow server (http://<host>:5000) or a database (sqlite:///<path>/mlflow.db), or "
           f"leave logger.mlflow.tracking_uri=null for {default}")
    why = None
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            why = f"is a database whose folder cannot be created ({_in_the_way(folder, error)})"
    try:
        if why is None:
            client = MlflowClient(tracking_uri)
            with _few_retries():
                client.search_experiments(max_results=1)
            return client
    except UnsupportedModelRegistryStoreURIException:
        why = f"is not a store MLflow knows (scheme {tracking_uri.partition(':')[0]}://)"
    except Exception as error:  # noqa: BLE001 - whatever MLflow or the network raise, one line
        if "MLFLOW_ALLOW_FILE_STORE" in str(error):
            why = "is a folder, which MLflow 3 no longer takes as a store (unless MLFLOW_ALLOW_FILE_STORE=true)"
        else:
            why = f"cannot be opened or reached ({first_line(error)})"
    raise ValueError(f"logger.mlflow.tracking_uri={tracking_uri} {why}: {fix}.") from None


def _mlflow_experiment(client, name: str, artifacts: str | None) -> None:
    """The experiment ``name``, created if missing, marked as model training (``EXPERIMENT_KIND``)
    unless someone set its kind already."""
    from mlflow.exceptions import MlflowException

    key, kind = EXPERIMENT_KIND
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name, artifact_location=artifacts, tags={key: kind})
            return
        except MlflowException:  # another job of the sweep created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(f"logger.mlflow.experiment_name={name} is a deleted MLflow experiment (id "
                         f"{experiment.experiment_id}): restore it (mlflow experiments restore --experiment-id "
                         f"{experiment.experiment_id}) or name another with logger.mlflow.experiment_name=.")
    if key not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, key, kind)


def _reopen_mlflow_run(client, previous: dict[str, Any]) -> tuple[str, dict, dict] | None:
    """Continue the MLflow run an earlier attempt of this run started: RUNNING again, tagged
    ``running`` without the earlier error; returns its id, params and the last step of each of its
    metrics. None (and a warning) if that run is not in this store."""
    from mlflow.exceptions import MlflowException

    run_id = previous.get("run_id")
    if not run_id:
        return None
    if previous.get("tracking_uri") != client.tracking_uri:
        log.warning(f"MLflow run {run_id} of the earlier attempt is in {previous.get('tracking_uri')}, not "
                    f"{client.tracking_uri}: the resumed run is tracked as a new run.")
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        log.warning(f"MLflow run {run_id} of the earlier attempt cannot be continued ({first_line(error)}): the "
                    f"resumed run is tracked as a new run.")
        return None
    if run.info.lifecycle_stage == "deleted":
        log.warning(f"MLflow run {run_id} of the earlier attempt was deleted: the resumed run is tracked as a new run.")
        return None
    steps = {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "status", "running")
    if "error" in run.data.tags:
        client.delete_tag(run_id, "error")
    log.info(f"MLflow run {run_id} continues (resumed from the run folder's last checkpoint).")
    return run_id, dict(run.data.params), steps


class ResumableMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, continuing one MLflow run across resumes: a metric value at a step
    the run already holds for that metric is not sent again, and a parameter keeps its first
    value (MLflow refuses to change one): a value that differs on a resume goes into the tag
    ``changed_on_resume`` instead."""

    def __init__(self, *args: Any, logged_params: dict[str, str] | None = None,
                 logged_steps: dict[str, int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._logged_params = dict(logged_params or {})
        self._logged_steps = dict(logged_steps or {})
        self._changed: dict[str, str] = {}

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        values = {key: str(value)[:250] for key, value in _flatten_dict(_convert_params(params)).items()}
        new = {key: value for key, value in values.items() if key not in self._logged_params}
        changed = {key: value for key, value in values.items()
                   if key in self._logged_params and self._logged_params[key] != value}
        if new:
            super().log_hyperparams(new)
            self._logged_params.update(new)
        if changed:
            self._changed.update(changed)
            text = "; ".join(f"{key}: {self._logged_params[key]} -> {value}" for key, value in self._changed.items())
            log.warning(f"MLflow keeps a run's first parameter values; changed on resume: {text} (tag "
                        f"changed_on_resume)")
            self.experiment.set_tag(self.run_id, "changed_on_resume", text[:5000])

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        at = step or 0
        metrics = {key: value for key, value in metrics.items() if at > self._logged_steps.get(key, -1)}
        if metrics:
            super().log_metrics(metrics, step)


def mlflow_logger(root: str, run_dir: str, tracking_uri: str | None = None, experiment_name: str | None = None,
                  **options: Any) -> MLFlowLogger:
    """Lightning's MLFlowLogger for this run: a SQLite database ``<root>/mlflow.db`` with the
    artifacts in ``<root>/mlartifacts/``, unless ``tracking_uri`` names another store (a team
    server); the experiment is the sweep's (``runs`` for single runs) unless named. A run resumed
    from its folder continues the MLflow run of its earlier attempts."""
    require("mlflow")
    where = run_context(root, run_dir)
    artifacts = None
    default = f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
    if not tracking_uri:
        tracking_uri = default
        artifacts = (Path(root).resolve() / "mlartifacts").as_uri()
        Path(root).mkdir(parents=True, exist_ok=True)
    name = experiment_name or where["sweep"] or "runs"
    tags = {"sweep": where["sweep"] or "", "swept_keys": ",".join(where["swept_keys"]), "status": "running",
            "run_dir": str(Path(run_dir).resolve())}
    reopened = None
    client = _open_mlflow(str(tracking_uri), default)
    if rank_zero_only.rank == 0:  # the other processes of a DDP run log nothing
        _mlflow_experiment(client, name, artifacts)
        reopened = _reopen_mlflow_run(client, previous_run(run_dir, "mlflow"))
    run_id, params, steps = reopened or (None, {}, {})
    return ResumableMLFlowLogger(experiment_name=name, run_name=where["run"], tracking_uri=tracking_uri,
                                 artifact_location=artifacts, tags=tags, run_id=run_id, logged_params=params,
                                 logged_steps=steps, **options)


#: W&B's run files: a 7-byte header, then LevelDB's log format, in blocks of 32 KiB.
WANDB_HEADER, LOG_BLOCK = 7, 32768


def wandb_history(path: str | Path) -> list[dict[str, Any]]:
    """The history rows (``{"train/loss": ..., "trainer/global_step": ...}``) of a W&B run file
    (``<run>/run-<id>.wandb``), as far as it was written: after W&B's header, LevelDB's log format
    (each 32 KiB block holds records behind a 7-byte header of checksum, length and type: whole,
    first, middle or last part), each whole record one of W&B's ``Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, rows, pending, offset = Path(path).read_bytes(), [], b"", WANDB_HEADER
    while offset + 7 <= len(data):
        if LOG_BLOCK - offset % LOG_BLOCK < 7:  # a block's tail too short for a header is padding
            offset += LOG_BLOCK - offset % LOG_BLOCK
            continue
        length, kind = int.from_bytes(data[offset + 4:offset + 6], "little"), data[offset + 6]
        if kind == 0 or offset + 7 + length > len(data):  # zeros, or a record cut off: the end of what was written
            break
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a whole record, or its last part
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def wandb_logged_steps(wandb_dir: Path, run_id: str) -> dict[str, int]:
    """The last ``trainer/global_step`` of each metric in the files of W&B run ``run_id`` below
    ``wandb_dir`` (what earlier attempts wrote; what W&B had not written when a process was
    killed is not there). A file that cannot be read is passed over with a warning."""
    steps: dict[str, int] = {}
    for path in sorted(Path(wandb_dir).glob(f"*run-*-{run_id}/run-{run_id}.wandb")):
        try:
            rows = wandb_history(path)
        except Exception as error:  # noqa: BLE001 - without the steps a resume may repeat a few
            log.warning(f"{path} could not be read ({first_line(error)}): the resumed W&B run may repeat the "
                        f"steps trained again after the checkpoint.")
            continue
        for row in rows:
            at = row.get("trainer/global_step")
            if isinstance(at, (int, float)):
                for key in row:
                    if key != "trainer/global_step" and not key.startswith("_"):
                        steps[key] = max(steps.get(key, -1), int(at))
    return steps


class ResumableWandbLogger(WandbLogger):
    """Lightning's WandbLogger, writing a resumed run to the W&B id of its earlier attempts without
    sending a value at a step those attempts' files already hold for that metric."""

    def __init__(self, *args: Any, logged_steps: dict[str, int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._logged_steps = dict(logged_steps or {})

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        if step is not None:
            metrics = {key: value for key, value in metrics.items() if step > self._logged_steps.get(key, -1)}
        if metrics:
            super().log_metrics(metrics, step)


def wandb_logger(root: str, run_dir: str, project: str = "vitlab", offline: bool = True, save_dir: str | None = None,
                 **options: Any) -> WandbLogger:
    """Lightning's WandbLogger for this run, writing to ``<save_dir>/wandb/`` (the run folder;
    offline unless ``offline=false``: ``wandb sync`` uploads it later); a sweep's jobs form one
    W&B group. The W&B id is kept in ``metrics.json``: a run resumed from its folder writes to the
    same id (``resume="allow"``), and ``wandb sync`` of its offline folders gives one run."""
    require("wandb")
    import wandb

    if not isinstance(offline, bool):
        raise ValueError(f"logger.wandb.offline={offline!r} must be true (write offline, wandb sync later) or false "
                         f"(log live after wandb login).")
    try:
        wandb.Settings(project=project)
    except Exception:  # noqa: BLE001 - W&B's own check of the name
        raise ValueError(f"logger.wandb.project={project!r} is not a W&B project name: use at most 128 characters "
                         f"and none of / \\ # ? % :") from None
    mode = options.get("mode")
    if mode is not None and mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is not a W&B mode: use one of {', '.join(WANDB_MODES)}, or "
                         f"leave it out and set logger.wandb.offline=true|false.")
    if mode is not None:
        offline = mode == "offline"
    if not offline and mode != "disabled" and rank_zero_only.rank == 0:
        # Live logging needs a key: checked here, before training, without a call to W&B's server
        # (where a terminal is attached, W&B asks for the key as it always does).
        try:
            wandb.login(verify=False)
        except wandb.errors.UsageError:
            raise ValueError("logger.wandb.offline=false logs live to W&B, but no W&B API key is configured: run "
                             "`wandb login` (or set WANDB_API_KEY) first, or keep logger.wandb.offline=true and "
                             "`wandb sync` the run folders later.") from None
    save_dir = writable_dir("logger.wandb.save_dir", save_dir or run_dir)
    where = run_context(root, run_dir)
    previous = previous_run(run_dir, "wandb").get("id")
    run_id = options.pop("id", None) or previous or secrets.token_hex(4)
    steps = wandb_logged_steps(Path(save_dir) / "wandb", run_id) if previous and rank_zero_only.rank == 0 else {}
    return ResumableWandbLogger(name=where["run"], group=where["sweep"], project=project, offline=offline,
                                save_dir=save_dir, id=run_id, config={"swept_keys": where["swept_keys"]},
                                logged_steps=steps, **options)


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
            run.finish(exit_code=0 if status in ("completed", "pruned") else 1)


def run_ids(loggers: list) -> dict[str, Any]:
    """Where the run is tracked, for ``metrics.json`` (a resumed run continues these) and the
    checkpoint's run description: ``{"mlflow": {"tracking_uri": ..., "run_id": ...}, "wandb":
    {"id": ..., "project": ...}}``, with the trackers in use."""
    ids: dict[str, Any] = {}
    for logger in trackers(loggers):
        if isinstance(logger, MLFlowLogger) and "mlflow" not in ids and logger.run_id is not None:
            ids["mlflow"] = {"tracking_uri": logger.experiment.tracking_uri, "run_id": logger.run_id}
        elif isinstance(logger, WandbLogger) and "wandb" not in ids and logger.version is not None:
            ids["wandb"] = {"id": logger.version, "project": logger.name}
    return ids


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
