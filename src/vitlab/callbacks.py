"""Callbacks that add what Lightning does not log or save by itself (throughput, a checkpoint on
SIGTERM, the random generators' states, a validation at the last step), and an EMA of the weights."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim.swa_utils import get_ema_multi_avg_fn


class Throughput(L.Callback):
    """Training images per second over each epoch, logged as ``train/images_per_s``: timed from
    the first training batch to the end of the last one, so data loading counts and validation
    does not. ``images_per_s`` is the mean over all epochs, for the run record."""

    def __init__(self) -> None:
        self._start, self._end, self._images = None, 0.0, 0
        self.total_images, self.total_seconds = 0, 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._images = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._start = self._start or time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._images, self._end = self._images + len(batch[1]), time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = self._end - (self._start or self._end)
        if seconds > 0:
            self.total_images, self.total_seconds = self.total_images + self._images, self.total_seconds + seconds
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
            # The whole state (optimiser, loops, callbacks): the re-run resumes from it.
            trainer.save_checkpoint(self.path, weights_only=False)


def rng_states() -> dict[str, Any]:
    """States of the torch, CUDA, numpy and Python generators, as tensors and plain values (so
    they load with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class RNGState(L.Callback):
    """The random generators' states as the callback's state in every checkpoint, restored
    before the first batch of a resumed fit, so it continues with the data order and
    augmentation draws of an uninterrupted run."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            set_rng_states(state_dict["rng"])


class ValidateLastStep(L.Callback):
    """A run that ends at ``trainer.max_steps`` inside an epoch (``budget.flops``) validates and
    checkpoints that last step too: Lightning validates when a callback asks it to stop."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class EMA(WeightAveraging):
    """Exponential moving average of the weights, ``ema = decay * ema + (1 - decay) * weights``
    after every optimizer step (the first copies the weights): Lightning's ``WeightAveraging``
    with torch's foreach EMA update (``get_ema_multi_avg_fn``, 2.8 instead of 7.4 ms per step
    for the default model on one CPU thread with the per-tensor update of Lightning's
    ``EMAWeightAveraging``). ``kwargs`` go to ``WeightAveraging`` (``device``, ``use_buffers``).

    As ``WeightAveraging`` documents, validation runs on the average, checkpoints store it as
    their ``state_dict`` (the raw weights beside it, for resuming), and fitting ends with the
    average in the model. Two cases it gets wrong in lightning 2.6.6 are fixed here:

    - testing or validating from a checkpoint with the trainer that fitted
      (``trainer.test(ckpt_path="best")``) restored the raw weights instead of the average,
      and ``trainer.validate`` after fitting swapped in the final average over any checkpoint;
    - a checkpoint saved during validation (a SIGTERM there) swapped the average and the raw
      weights, because the model holds the average then.
    """

    def __init__(self, decay: float = 0.999, **kwargs: Any):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(
                f"callbacks.ema.decay={decay!r} is not in [0, 1): the average spans about "
                f"1 / (1 - decay) steps; use e.g. 0.999, or 0.99 for runs of a few hundred steps."
            )
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay), **kwargs)
        self.decay = decay
        self._swapped = False  # the model holds the average (during validation)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only while fitting: afterwards the model holds the average (or a checkpoint's).
        if trainer.state.fn == TrainerFn.FITTING and self._average_model is not None:
            super().on_validation_epoch_start(trainer, pl_module)
            self._swapped = True

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            super().on_validation_epoch_end(trainer, pl_module)
            self._swapped = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self._swapped:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            return
        # Mid-validation: checkpoint["state_dict"] already holds the average; the averaged
        # copy holds the raw weights.
        state = self._average_model.state_dict()
        checkpoint["current_model_state"] = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
        checkpoint["averaging_state"] = {k: v for k, v in state.items() if not k.startswith("module.")}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
        # Testing, validating or predicting: the model has loaded the checkpoint's state_dict,
        # the average, and keeps it.
