"""Callbacks that add what Lightning does not log by itself."""

from __future__ import annotations

import os
import time

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class Throughput(L.Callback):
    """Training images per second over each epoch, logged as ``train/images_per_s``.

    Timed from the first training batch to the end of the last one, so data loading counts
    and validation does not. ``images_per_s`` holds the mean over all epochs for the run record.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._end = 0.0
        self._images = 0
        self.total_images = 0
        self.total_seconds = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._images = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._images += len(batch[1])
        self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None or self._end <= self._start:
            return
        seconds = self._end - self._start
        self.total_images += self._images
        self.total_seconds += seconds
        pl_module.log("train/images_per_s", self._images / seconds, on_step=False, on_epoch=True)

    @property
    def images_per_s(self) -> float | None:
        return self.total_images / self.total_seconds if self.total_seconds else None


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (what cluster schedulers send before preemption), save ``last.ckpt`` before
    the process exits, so a re-run resumes from the step it reached.

    Lightning stops at the next step boundary with ``SIGTERMException``; other exceptions (a NaN
    loss, say) leave ``last.ckpt`` as the last good end of epoch.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = os.path.join(dirpath, filename)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
