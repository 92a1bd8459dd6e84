"""Train and test a model from the Hydra config: ``python -m vitlab.train [overrides]``.

Seed, instantiate the datamodule, network, LightningModule, callbacks, loggers and trainer
from the config, fit, test the best checkpoint, and record the run.
"""

from __future__ import annotations

import logging
import sys

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from vitlab.checkpoint import RunInfo, check_compatible, load_checkpoint
from vitlab.config import CONFIG_DIR, instantiate_dict, quote_path_overrides
from vitlab.data import DataError
from vitlab.records import RunRecord
from vitlab.rundir import LAST_CHECKPOINT, failure_reason, read_metrics
from vitlab.sweep import sweep_job

log = logging.getLogger(__name__)

#: Errors a user causes and fixes (config values, data on disk, a diverging learning rate).
USER_ERRORS = (ValueError, DataError, FloatingPointError, FileNotFoundError)


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None) -> L.Trainer:
    """The Trainer with the config's callbacks and loggers (and any given here)."""
    callbacks = instantiate_dict(cfg.get("callbacks")) + list(extra_callbacks or [])
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_dict(cfg.get("logger")) or False)


#: ``torch.compile`` modes (``compile.mode``); null is torch's default.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_network(net: torch.nn.Module, options: DictConfig | None) -> None:
    """``torch.compile`` the network in place when ``compile.enabled``: ``nn.Module.compile``
    keeps the module and its state_dict keys, so checkpoints load with or without it. The
    compilation itself happens at the first training step."""
    if not options or not options.get("enabled"):
        return
    mode = options.get("mode")
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile.mode={mode!r} is not one of {', '.join(COMPILE_MODES)} (or null for the default).")
    net.compile(mode=mode, dynamic=options.get("dynamic"), fullgraph=bool(options.get("fullgraph")))


def build(cfg: DictConfig):
    """Instantiate the datamodule, network, LightningModule and trainer from the config."""
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg.torch_threads)
    datamodule = hydra.utils.instantiate(cfg.data)
    net = hydra.utils.instantiate(cfg.model)
    compile_network(net, cfg.get("compile"))
    module = hydra.utils.instantiate(
        cfg.module,
        net=net,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    return datamodule, module, build_trainer(cfg)


def train(cfg: DictConfig) -> dict:
    output_dir = HydraConfig.get().runtime.output_dir
    previous = read_metrics(output_dir) if cfg.resume else {}
    if previous.get("status") == "completed":
        log.info(f"{output_dir} holds a completed run: skipped (resume=false trains it again).")
        return previous
    record = RunRecord(cfg, output_dir, previous)
    # Continue an interrupted attempt in this folder from its last checkpoint.
    resuming = not cfg.get("ckpt_path") and cfg.resume and record.last_checkpoint is not None
    ckpt_path = cfg.get("ckpt_path") or (record.last_checkpoint if cfg.resume else None)
    try:
        # Opened without unpickling code, before anything is built or trained.
        checkpoint = load_checkpoint(ckpt_path) if ckpt_path else None
        L.seed_everything(cfg.seed, workers=True)
        datamodule, module, trainer = build(cfg)
        if checkpoint is not None:
            fix = "pass this run's settings again, or resume=false to train from scratch" if resuming else None
            check_compatible(checkpoint, ckpt_path, cfg.model, module, name="ckpt_path", fix=fix)
            del checkpoint
        # Every checkpoint describes its run (for eval/predict) and carries the RNG states (for resume).
        trainer.callbacks.append(RunInfo(cfg, datamodule))
        record.describe_model(module.net, datamodule.image_size, datamodule.channels)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        record.fitted(trainer)
        test_metrics = {}
        if cfg.get("test") and not trainer.interrupted:
            best = getattr(trainer.checkpoint_callback, "best_model_path", None)
            test_metrics = trainer.test(module, datamodule=datamodule, ckpt_path="best" if best else None,
                                        weights_only=True)[0]
        return record.finish(trainer, test_metrics)
    except BaseException as error:
        record.fail(error)
        raise


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            with sweep_job(HydraConfig.get().runtime.output_dir):
                metrics = train(cfg)
        else:
            metrics = train(cfg)
    except SIGTERMException:
        # Preemption: last.ckpt was saved at the step reached (vitlab.callbacks.CheckpointOnSigterm).
        last = f"{HydraConfig.get().runtime.output_dir}/{LAST_CHECKPOINT}"
        print(f"interrupted by SIGTERM; resume with the same name=/sweep= or ckpt_path={last}", file=sys.stderr)
        sys.exit(143)
    except Exception as error:
        root, reason = failure_reason(error)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # The failure is recorded in the job's metrics.json; the other jobs go on and the
            # sweep exits non-zero at its end (vitlab.sweep.SweepCallback).
            log.error(f"job failed: {reason}")
            return None
        if isinstance(root, USER_ERRORS):
            # A config or data mistake: the message names the value and the fix; the
            # traceback is kept in metrics.json rather than printed.
            print(f"error: {reason}\n(traceback in {HydraConfig.get().runtime.output_dir}/metrics.json)", file=sys.stderr)
            sys.exit(1)
        raise
    # The value a Hydra sweeper (e.g. Optuna) optimises.
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    sys.argv = quote_path_overrides(sys.argv)
    main()
