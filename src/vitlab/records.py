"""A training run's record, kept by one object: ``metrics.json`` (status, figures, learning
curves), the resolved ``config.yaml``, the TensorBoard HParams row, ``curves.png`` and what the
trackers hear.

``with RunRecord(cfg, output_dir) as record:`` opens it (``running``) and closes it
(``completed``, ``failed`` with the reason and traceback, or ``interrupted``); as a callback in
the trainer it adds the per-epoch history, the best checkpoint, throughput, the data read and
the test metrics. ``metrics.json`` is rewritten whole at each step, so it is true at any moment.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from vitlab import tracking
from vitlab.budget import machine_name
from vitlab.callbacks import Throughput
from vitlab.errors import failure_reason
from vitlab.models import count_parameters, flops_per_image
from vitlab.rundir import LAST_CHECKPOINT, METRICS_FILE, read_metrics, write_json

#: Config sections whose scalar fields all go into the HParams table (``_target_`` as ``name`` where
#: the section has no ``name`` of its own: ``model.name`` names the network).
HPARAM_SECTIONS = ("model", "optimizer", "scheduler", "module")
#: Single fields that go in as well.
HPARAM_FIELDS = ("seed", "data.batch_size", "trainer.max_epochs", "trainer.precision")
#: Config groups whose choice goes in as ``choice/<group>``.
HPARAM_GROUPS = ("data", "model", "optimizer", "scheduler", "trainer", "experiment")
#: Epoch-level metrics kept in ``metrics.json["history"]``, beside the epoch's mean training loss.
HISTORY_KEYS = ("train/acc", "val/loss", "val/acc", "train/lr")


def hparams_for(cfg: DictConfig, choices: dict[str, str] | None = None,
                swept: Iterable[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """``({"model/patch_size": 4, ...}, [names of the swept])``: the ``swept`` keys first (a config
    group as ``choice/<group>``), then the hyperparameters a sweep compares, taken from the same
    flat config the trackers get."""
    flat, choices, swept = tracking.flat_config(cfg), choices or {}, list(swept)
    if "model" in swept and "model.name" in flat and "model.name" not in swept:
        # Models swept as a config group differ by their network's name (simple_vit, deit_tiny_patch16_224).
        swept.insert(swept.index("model") + 1, "model.name")
    sections = [key for key in flat if key.partition(".")[0] in HPARAM_SECTIONS and key.count(".") == 1]
    row: dict[str, Any] = {}
    for key in dict.fromkeys([*swept, *HPARAM_FIELDS, *HPARAM_GROUPS, *sections]):
        if key in flat and (key in swept or not isinstance(flat[key], list)):
            name, value = key.replace(".", "/"), flat[key]
            if key.endswith("._target_"):
                if f"{key[: -len('_target_')]}name" in flat:
                    continue
                name, value = name.replace("/_target_", "/name"), str(value).rsplit(".", 1)[-1]
        elif choices.get(key):
            name, value = f"choice/{key}", choices[key]
        else:
            continue
        row[name] = "none" if value is None else str(value) if isinstance(value, list) else value
    return row, list(row)[: len([key for key in swept if key in flat or choices.get(key)])]


def hparams_summaries(hparams: dict[str, Any], metrics: Iterable[str], swept: Iterable[str], trial: str) -> list:
    """The three HParams-plugin summaries of a run in TensorBoard's own protos: the experiment
    (the swept hyperparameters marked as differing, so the tab shows them and the ``hp/*`` metrics
    as its default columns), the session's values under the trial name ``trial``, and its end."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(group_name=trial, start_time_secs=time.time())
    infos = []
    for name, value in hparams.items():
        kind, field = ((api_pb2.DATA_TYPE_BOOL, "bool_value") if isinstance(value, bool) else
                       (api_pb2.DATA_TYPE_FLOAT64, "number_value") if isinstance(value, (int, float)) else
                       (api_pb2.DATA_TYPE_STRING, "string_value"))
        setattr(start.hparams[name], field, value if kind != api_pb2.DATA_TYPE_STRING else str(value))
        infos.append(api_pb2.HParamInfo(name=name, type=kind, differs=name in swept))
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics])
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    parts = {metadata.EXPERIMENT_TAG: {"experiment": experiment},
             metadata.SESSION_START_INFO_TAG: {"session_start_info": start},
             metadata.SESSION_END_INFO_TAG: {"session_end_info": end}}
    version = metadata.PLUGIN_DATA_VERSION
    return [Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(
        plugin_data_pb2.HParamsPluginData(version=version, **part)))]) for tag, part in parts.items()]


class RunRecord(L.Callback):
    """The owner of a training run's ``metrics.json``: a context manager around the run and a
    callback in its trainer. Under DDP every process holds one; rank 0 writes."""

    def __init__(self, cfg: DictConfig, output_dir: str | Path):
        self.cfg = cfg
        self.dir = Path(output_dir)
        #: What an earlier attempt in this folder recorded (a re-run resumes or skips it).
        self.previous = read_metrics(self.dir) if cfg.get("resume") else {}
        self.payload: dict[str, Any] = {}
        self.writer = rank_zero_only.rank == 0
        self.trainer: L.Trainer | None = None
        self._loss_sum, self._losses = None, 0
        #: Metrics of this epoch from callbacks that do not run every epoch (``add_epoch_metrics``).
        self._epoch_metrics: dict[str, float] = {}

    @property
    def completed(self) -> bool:
        """Whether an earlier attempt in this folder finished: completed, or pruned by its search."""
        return self.previous.get("status") in ("completed", "pruned")

    @property
    def last_checkpoint(self) -> str | None:
        """``checkpoints/last.ckpt`` of an earlier, unfinished attempt in this folder."""
        last = self.dir / LAST_CHECKPOINT
        return str(last) if last.is_file() else None

    def save(self) -> None:
        if self.writer:
            self.payload["wall_time_s"] = round(time.time() - self.start, 3)
            write_json(self.dir / METRICS_FILE, self.payload)

    def __enter__(self) -> RunRecord:
        # A resumed run counts the wall time of its earlier attempts too.
        self.start = time.time() - float(self.previous.get("wall_time_s", 0.0))
        self.payload = {"status": "running", "seed": self.cfg.get("seed"), "tags": list(self.cfg.get("tags") or []),
                        "history": list(self.previous.get("history") or [])}
        if "init_from" in self.previous:  # a resumed fine-tuning run keeps what its first attempt loaded
            self.payload["init_from"] = self.previous["init_from"]
        if self.previous.get("tracking") and self.last_checkpoint and not self.cfg.get("ckpt_path"):
            # Resumed from this folder: its trackers continue the runs named here (vitlab.tracking).
            self.payload["tracking"] = self.previous["tracking"]
        elif self.previous.get("tracking") and self.writer:
            # An attempt killed before its first checkpoint: this one starts afresh, in new tracker runs.
            tracking.end_abandoned_run(self.previous["tracking"])
        self.save_config()
        return self

    def reuse(self, source: Path) -> dict:
        """Record the results of ``source``, a completed run of the same config (``reuse``), as
        this run's: its metrics.json with ``reused_from`` naming it (relative to the working folder
        when below it, as kept records are committed), beside this run's config.yaml."""
        source, here = Path(source).resolve(), Path.cwd().resolve()
        named = source.relative_to(here) if source.is_relative_to(here) else source
        self.payload = read_metrics(source) | {"reused_from": str(named)}
        if self.writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.cfg, self.dir / "config.yaml", resolve=True)
            write_json(self.dir / METRICS_FILE, self.payload)
        return self.payload

    def describe_model(self, net: torch.nn.Module, image_size: int, channels: int) -> None:
        # After build set torch's threads: the machine is part of what the run's times mean.
        forward = flops_per_image(net, image_size, channels)
        self.payload.update(params=count_parameters(net), flops_per_image=forward,
                            machine=machine_name(self.cfg.trainer.get("accelerator", "auto")))
        # What a training step's forward costs where it differs (patch dropout keeps fewer tokens).
        training = flops_per_image(net, image_size, channels, training=True)
        if training != forward:
            self.payload["train_flops_per_image"] = training
        self.save()

    def save_config(self) -> None:
        """``config.yaml`` (the resolved config) and ``metrics.json``."""
        if self.writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.cfg, self.dir / "config.yaml", resolve=True)
        self.save()

    def set_init(self, init: dict[str, Any]) -> None:
        """What fine-tuning (``init_from``) loaded, reset and resampled."""
        self.payload["init_from"] = init
        self.save()

    def set_budget(self, plan: dict[str, Any]) -> None:
        """The compute budget (``vitlab.budget``), and the config again with the steps it set."""
        self.payload["budget"] = plan
        self.save_config()

    def set_pruned(self, epoch: int) -> None:
        """The run's Optuna trial was pruned after this epoch (``vitlab.search``): it ends ``pruned``."""
        self.payload["pruned_at_epoch"] = epoch
        self.save()

    def __exit__(self, kind, error, tb) -> bool:
        if error is not None:
            root, reason = failure_reason(error)
            status = "interrupted" if isinstance(root, (SIGTERMException, KeyboardInterrupt)) else "failed"
            self.payload.update(status=status, error=reason,
                                traceback="".join(traceback.format_exception(kind, error, tb)))
        elif self.trainer is not None and self.trainer.interrupted:
            self.payload["status"] = "interrupted"
        elif "pruned_at_epoch" in self.payload:
            self.payload["status"] = "pruned"
        else:
            self.payload["status"] = "completed"
        if self.trainer is not None:
            self._record_data(self.trainer.datamodule)
        self.save()
        if self.writer and self.trainer is not None:
            if error is None:
                self._log_hparams()
                from vitlab.plots import plot_run_curves  # matplotlib only once the run is over

                plot_run_curves(self.dir)
            tracking.run_ended(self.trainer.loggers, self.dir, self.payload)
        elif self.writer and self.cfg.get("logger"):
            self._tell_trackers_of_early_failure()
        return False

    def _tell_trackers_of_early_failure(self) -> None:
        """A run that failed before its trainer existed (a config mistake) still shows, as
        failed, in the trackers of a sweep; a tracker that cannot be built is passed over."""
        from vitlab.config import instantiate_dict

        try:
            loggers = tracking.trackers(instantiate_dict(self.cfg.logger))
        except Exception:  # noqa: BLE001 - the run's own failure is what gets reported
            return
        if loggers:
            tracking.run_started(loggers, self.cfg)
            tracking.run_ended(loggers, self.dir, self.payload)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trainer = trainer
        if stage == "fit" and self.writer:
            tracking.run_started(trainer.loggers, self.cfg)
            if ids := tracking.run_ids(trainer.loggers):
                self.payload["tracking"] = ids
                self.save()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed fit restarts at the checkpoint's epoch: later epochs of the history go.
        self.payload["history"] = [h for h in self.payload["history"] if h.get("epoch", 0) <= trainer.current_epoch]

    def add_epoch_metrics(self, metrics: dict[str, float]) -> None:
        """Metrics a callback computed in this epoch but not in every epoch (the probes of frozen
        features, ``vitlab.probe``): into this epoch's history entry and, as the latest values,
        the top level. (``trainer.callback_metrics`` would repeat them in the epochs between.)"""
        self._epoch_metrics.update(metrics)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loss_sum, self._losses = None, 0
        self._epoch_metrics = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # summed on the device: no sync per step
            self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
            self._losses += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        entry: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        if self._losses:
            entry["train/loss"] = float(self._loss_sum) / self._losses
        metrics = trainer.callback_metrics
        entry.update({key: float(metrics[key]) for key in HISTORY_KEYS if key in metrics})
        entry.update(self._epoch_metrics)
        self.payload.update(self._epoch_metrics)
        self.payload["history"].append(entry)
        self.save()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before testing restores the checkpoint callback from the best checkpoint.
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_score", None)
        throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
        self.payload.update(
            status="interrupted" if trainer.interrupted else "fitted",
            epochs=trainer.current_epoch,
            global_step=trainer.global_step,
            best_val_acc=float(best) if best is not None else None,
            best_checkpoint=getattr(ckpt, "best_model_path", None) or None,
            last_checkpoint=getattr(ckpt, "last_model_path", None) or None,
            train_images_per_s=round(throughput.images_per_s, 1) if throughput and throughput.images_per_s else None,
        )
        self._record_data(trainer.datamodule)
        self.save()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.payload.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        self.save()

    def _record_data(self, datamodule) -> None:
        """How the data was read, and the files skipped (``data.on_bad_file=skip``)."""
        if hasattr(datamodule, "streaming"):
            self.payload["data_streaming"] = bool(datamodule.streaming)
        skipped = getattr(datamodule, "skipped_files", None)
        if skipped is not None:
            self.payload["skipped_files"] = len(skipped)
            if skipped:
                self.payload["skipped_file_names"] = sorted(set(skipped.values()))[:1000]

    def _log_hparams(self) -> None:
        """The HParams row: hyperparameters (the swept ones first) with the final ``hp/*`` metrics
        (not Lightning's ``hp_metric`` placeholder)."""
        tensorboard = next((lg for lg in self.trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        metrics = {"hp/best_val_acc": self.payload.get("best_val_acc"), "hp/test_acc": self.payload.get("test/acc"),
                   "hp/test_loss": self.payload.get("test/loss")}
        metrics = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if tensorboard is None or not metrics:
            return
        from hydra.core.hydra_config import HydraConfig

        choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else None
        where = tracking.run_context(self.cfg.paths.log_dir, self.dir)
        hparams, differ = hparams_for(self.cfg, choices, where["swept_keys"])
        # The job folder's name first (all a sweep's folder shows), then the sweep: no two sweeps'
        # "0_model.patch_size=4" merge into one trial in a TensorBoard opened on outputs/.
        trial = f"{where['run']} ({where['sweep']})" if where["sweep"] else where["run"]
        tensorboard.log_metrics(metrics, step=self.trainer.global_step)
        writer = tensorboard.experiment.file_writer
        for summary in hparams_summaries(hparams, metrics, differ, trial):
            writer.add_summary(summary, self.trainer.global_step)
        writer.flush()
