"""What a run leaves behind besides checkpoints and event files: ``metrics.json``, the
resolved ``config.yaml``, and the TensorBoard HParams entry with real final metrics."""

from __future__ import annotations

import math
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from vitlab.callbacks import Throughput
from vitlab.models import count_parameters, flops_per_image
from vitlab.rundir import LAST_CHECKPOINT, METRICS_FILE, failure_reason, write_json

#: Config sections whose fields all go into the HParams table (``_target_`` shortened).
HPARAM_SECTIONS = ("model", "optimizer", "scheduler", "module")
#: Single fields that go in as well.
HPARAM_FIELDS = ("seed", "data.batch_size", "trainer.max_epochs", "trainer.precision")


def hparams_for(cfg: DictConfig, choices: dict[str, str] | None = None) -> dict[str, Any]:
    """Flat ``{"model/patch_size": 4, ...}`` of the hyperparameters a sweep compares."""
    flat: dict[str, Any] = {}
    for section in HPARAM_SECTIONS:
        node = cfg.get(section)
        if node is None:
            continue
        for key, value in OmegaConf.to_container(node, resolve=True).items():
            if key == "_target_":
                flat[f"{section}/name"] = str(value).rsplit(".", 1)[-1]
            elif not key.startswith("_") and not isinstance(value, (dict, list)):
                flat[f"{section}/{key}"] = value
    for dotted in HPARAM_FIELDS:
        value = OmegaConf.select(cfg, dotted)
        if value is not None:
            flat[dotted.replace(".", "/")] = value
    for group, choice in (choices or {}).items():
        if group in ("data", "model", "optimizer", "scheduler", "trainer", "experiment") and choice:
            flat[f"choice/{group}"] = choice
    return {k: ("none" if v is None else v) for k, v in flat.items()}


class RunRecord:
    """Keeps ``metrics.json`` in the run folder true at every moment.

    ``status`` is ``running`` from the start, ``fitted`` between fit and test, then
    ``completed``, ``failed`` (with the one-line reason and the traceback) or ``interrupted``;
    a failure never removes checkpoints already written.
    """

    def __init__(self, cfg: DictConfig, output_dir: str | Path, previous: dict | None = None):
        self.cfg = cfg
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # A resumed run counts the wall time of its earlier attempts too.
        self.start = time.time() - float((previous or {}).get("wall_time_s", 0.0))
        self.payload: dict[str, Any] = {"status": "running", "seed": cfg.get("seed"), "tags": list(cfg.get("tags") or [])}
        # Under DDP every process runs this; one writes (Lightning's rank from the environment).
        self.writer = rank_zero_only.rank == 0
        if self.writer:
            OmegaConf.save(cfg, self.dir / "config.yaml", resolve=True)
        self.save()

    @property
    def last_checkpoint(self) -> str | None:
        """``checkpoints/last.ckpt`` of an earlier, unfinished attempt in this folder."""
        last = self.dir / LAST_CHECKPOINT
        return str(last) if last.is_file() else None

    def save(self) -> None:
        if not self.writer:
            return
        self.payload["wall_time_s"] = round(time.time() - self.start, 3)
        write_json(self.dir / METRICS_FILE, self.payload)

    def describe_model(self, net, image_size: int, channels: int) -> None:
        self.payload["params"] = count_parameters(net)
        self.payload["flops_per_image"] = flops_per_image(net, image_size, channels)
        self.save()

    def fail(self, error: BaseException) -> None:
        root, reason = failure_reason(error)
        status = "interrupted" if isinstance(root, SIGTERMException) else "failed"
        self.payload.update(status=status, error=reason, traceback=traceback.format_exc())
        self.save()

    def fitted(self, trainer: L.Trainer) -> None:
        """Record the fit; called before testing, which restores the checkpoint callback's
        state from the best checkpoint."""
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
        self.record_data(trainer.datamodule)
        self.save()

    def record_data(self, datamodule) -> None:
        """How the data was read, and the unreadable files skipped (``data.on_bad_file=skip``)."""
        if hasattr(datamodule, "streaming"):
            self.payload["data_streaming"] = bool(datamodule.streaming)
        skipped = getattr(datamodule, "skipped_files", None)
        if skipped is not None:
            self.payload["skipped_files"] = len(skipped)
            if skipped:
                self.payload["skipped_file_names"] = sorted(set(skipped.values()))[:1000]

    def finish(self, trainer: L.Trainer, test_metrics: dict[str, float]) -> dict[str, Any]:
        if self.payload["status"] != "interrupted":
            self.payload["status"] = "completed"
        self.payload.update({key: float(value) for key, value in test_metrics.items()})
        self.record_data(trainer.datamodule)
        self.save()
        if not self.writer:
            return self.payload
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is not None:
            self._log_hparams(tensorboard)
            tensorboard.experiment.flush()
        self._plot_curves(tensorboard, trainer.global_step)
        return self.payload

    def _log_hparams(self, logger: TensorBoardLogger) -> None:
        """The HParams tab's row: hyperparameters with best val/acc and test metrics.

        Logged under ``hp/*`` tags at the end of the run, so the table shows final figures
        rather than Lightning's ``hp_metric`` placeholder.
        """
        metrics = {
            "hp/best_val_acc": self.payload.get("best_val_acc"),
            "hp/test_acc": self.payload.get("test/acc"),
            "hp/test_loss": self.payload.get("test/loss"),
        }
        metrics = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if not metrics:
            return
        from hydra.core.hydra_config import HydraConfig

        choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else None
        logger.log_hyperparams(hparams_for(self.cfg, choices), metrics=metrics)

    def _plot_curves(self, logger: TensorBoardLogger | None, step: int) -> None:
        """``curves.png`` in the run folder (learning curves from the event files), also logged
        to TensorBoard's Images tab."""
        from torchvision.io import decode_png, read_file

        from vitlab.plots import plot_run_curves  # matplotlib only once the run is over

        png = plot_run_curves(self.dir)
        if png is not None and logger is not None:
            logger.experiment.add_image("curves", decode_png(read_file(str(png))), step)
            logger.finalize("success")
