"""Train and test a model from the Hydra config: ``python -m vitlab.train [overrides]``.

Compose the config, open the run's record, build the datamodule, network, LightningModule and
trainer, fit, test the best checkpoint, return the metrics. The record (``vitlab.records``)
writes everything the run leaves besides checkpoints and logs; ``vitlab.errors`` decides how a
failure ends.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from vitlab import budget
from vitlab.callbacks import RNGState, ValidateLastStep
from vitlab.checkpoint import RunInfo, check_compatible, load_checkpoint
from vitlab.config import (CONFIG_PATH, check_value_types, instantiate_dict, instantiate_model, keep_config_name,
                           quote_path_overrides, register_resolvers)
from vitlab.data.contract import check_data_config, check_datamodule
from vitlab.errors import entry_point
from vitlab.module import check_test_variants
from vitlab.records import RunRecord
from vitlab.results import identical_run
from vitlab.search import search_callbacks
from vitlab.sweep import sweep_job
from vitlab.transfer import init_from_checkpoint

log = logging.getLogger(__name__)
register_resolvers()


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None) -> L.Trainer:
    """The Trainer with the config's callbacks and loggers (and any given here)."""
    callbacks = instantiate_dict(cfg.get("callbacks")) + list(extra_callbacks or [])
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_dict(cfg.get("logger")) or False)


#: ``torch.compile`` modes (``compile.mode``); null is torch's default.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_network(net: torch.nn.Module, options: DictConfig | None, accelerator: str = "auto") -> bool:
    """``torch.compile`` the network in place when ``compile.enabled`` (``auto``: on CUDA only):
    ``nn.Module.compile`` keeps the module and its state_dict keys, so checkpoints load with or
    without it. Inductor's on-disk caches go to ``compile.cache_dir``, which a sweep's jobs share,
    so that only the first job compiles from scratch. The compilation itself happens at the first
    training step. Returns whether the network is compiled."""
    enabled = (options or {}).get("enabled")
    if enabled == "auto":
        enabled = budget.on_cuda(accelerator)
    elif enabled not in (None, True, False):
        raise ValueError(f"compile.enabled={enabled!r} must be true, false or auto (on CUDA only).")
    if not enabled:
        return False
    mode = options.get("mode")
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile.mode={mode!r} is not one of {', '.join(COMPILE_MODES)} (or null for the default).")
    if options.get("cache_dir"):
        # torch's documented setting for every on-disk compile cache (FX graph, AOTAutograd, Triton).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(options.cache_dir).resolve())
    # RoPE rotates by a complex product (vitlab.models.position.rotate_pairs), which inductor runs as
    # eager does, warning that this "may be worse than eager": measured faster than the real-valued
    # rotation compiled (README, the switches' training speed), so the warning says nothing a user should act on.
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex operators")
    net.compile(mode=mode, dynamic=options.get("dynamic"), fullgraph=bool(options.get("fullgraph")))
    return True


def build(cfg: DictConfig, callbacks: tuple = (), record: RunRecord | None = None):
    """Instantiate the datamodule, network (described to the record before it is compiled),
    LightningModule and trainer (with these callbacks too) from the config."""
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg.torch_threads)
    datamodule = hydra.utils.instantiate(cfg.data)
    # What the run reads of the datamodule (vitlab.data.contract), before anything uses it.
    check_datamodule(datamodule, cfg.data, test=bool(cfg.get("test")),
                     probes=(cfg.get("probe") or {}).get("every_n_epochs") is not None)
    net = instantiate_model(cfg.model)
    # Test-time variants the network cannot run stop here, not after training.
    check_test_variants(net, datamodule.channels, cfg.module.get("test_image_sizes"),
                        cfg.module.get("test_patch_sizes"))
    if record is not None:
        record.describe_model(net, datamodule.image_size, datamodule.channels)
        apply_budget(cfg, net, datamodule, record)
    compiled = compile_network(net, cfg.get("compile"), cfg.trainer.get("accelerator", "auto"))
    if compiled:
        # Whole training batches only: the smaller last one would compile a second graph
        # (evaluation pads its smaller batches instead: pad_eval_batches).
        datamodule.drop_last = True
    module = hydra.utils.instantiate(
        cfg.module,
        net=net,
        pad_eval_batches=compiled,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    return datamodule, module, build_trainer(cfg, [*callbacks, *((record,) if record else ())])


def apply_budget(cfg: DictConfig, net: torch.nn.Module, datamodule, record: RunRecord) -> None:
    """``budget.flops`` or ``budget.minutes`` set ``trainer.max_steps`` (and no epoch limit)."""
    def measure() -> dict:
        return budget.measure_images_per_s(net, cfg, datamodule.image_size, datamodule.channels)

    flops = record.payload.get("train_flops_per_image", record.payload["flops_per_image"])
    plan = budget.plan(cfg, flops, measure, previous=record.previous.get("budget"))
    if plan is not None:
        with open_dict(cfg):
            cfg.trainer.max_steps, cfg.trainer.max_epochs = plan["steps"], -1
        record.set_budget(plan)
        log.info(f"budget: {plan['steps']} steps of {plan['images'] // plan['steps']} images, "
                 f"{plan['train_flops']:.3g} training FLOPs")


def check_trains(cfg: DictConfig) -> None:
    """Refuse, before anything is built, a config that trains nothing."""
    for key in ("max_epochs", "max_steps"):
        if cfg.trainer.get(key) == 0:
            raise ValueError(f"trainer.{key}=0 trains nothing: set it above 0 (or -1 for no limit); to test a "
                             f"trained model use python -m vitlab.eval ckpt_path=<run>/checkpoints/<best>.ckpt")


def train(cfg: DictConfig) -> dict:
    check_value_types(cfg)
    check_trains(cfg)
    check_data_config(cfg)
    keep_config_name(cfg)
    record = RunRecord(cfg, HydraConfig.get().runtime.output_dir)
    if record.completed:
        log.info(f"{record.dir} holds a {record.previous['status']} run: skipped (resume=false trains it again).")
        return record.previous
    if cfg.get("reuse") and (same := identical_run(OmegaConf.to_container(cfg, resolve=True), cfg.reuse, record.dir)):
        log.info(f"{same} completed the same run (the same config but folders, names and threads): its results "
                 f"are taken, not trained again (reuse=null trains it).")
        return record.reuse(same)
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ValueError(f"ckpt_path={cfg.ckpt_path} resumes a run and init_from={cfg.init_from} starts a new one from "
                         f"its weights: set only one of them.")
    # Continue an interrupted attempt in this folder from its last checkpoint.
    resuming = not cfg.get("ckpt_path") and cfg.resume and record.last_checkpoint is not None
    ckpt_path = cfg.get("ckpt_path") or (record.last_checkpoint if cfg.resume else None)
    with record:
        # Opened without unpickling code, before anything is built or trained.
        checkpoint = load_checkpoint(ckpt_path) if ckpt_path else None
        L.seed_everything(cfg.seed, workers=True)
        datamodule, module, trainer = build(cfg, (RNGState(), ValidateLastStep()), record)
        # Every checkpoint describes its run, for eval and predict.
        trainer.callbacks.append(RunInfo(cfg, datamodule))
        # Probes of the frozen features (probe.every_n_epochs), beside the default callbacks; a
        # network without pooled features stops the run here, before it trains.
        from vitlab.probe import probe_callbacks

        trainer.callbacks.extend(probe_callbacks(cfg.get("probe"), module.net))
        # A job of an Optuna search reports to its trial and may be pruned (vitlab.search).
        trial = search_callbacks(cfg.get("optuna"))
        trainer.callbacks.extend(trial)
        if checkpoint is not None:
            fix = "pass this run's settings again, or resume=false to train from scratch" if resuming else None
            check_compatible(checkpoint, ckpt_path, cfg.model, module, name="ckpt_path", fix=fix)
            del checkpoint
        elif cfg.get("init_from"):
            record.set_init(init_from_checkpoint(module.net, cfg.init_from, cfg.model, head=cfg.init.head))
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if pruned := next((c.pruned_at for c in trial if c.pruned_at), None):
            record.set_pruned(pruned)
        if cfg.get("test") and not trainer.interrupted and not pruned:
            best = getattr(trainer.checkpoint_callback, "best_model_path", None)
            trainer.test(module, datamodule=datamodule, ckpt_path="best" if best else None, weights_only=True)
    return record.payload


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@entry_point
def main(cfg: DictConfig) -> float | None:
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        with sweep_job(HydraConfig.get().runtime.output_dir):
            metrics = train(cfg)
    else:
        metrics = train(cfg)
    # The value a Hydra sweeper (e.g. Optuna) optimises.
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    sys.argv = quote_path_overrides(sys.argv)
    main()
