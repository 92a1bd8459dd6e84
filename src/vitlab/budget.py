"""Compute-matched budgets: ``budget.flops`` (training FLOPs) or ``budget.minutes`` (of training
steps on this machine) become the run's number of optimiser steps, so that the settings of a
sweep are compared at equal training compute, as the ViT paper's Fig. 5 and Table 5 compare
models. Warmup and schedule follow, since they are laid out over the run's steps."""

from __future__ import annotations

import copy
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig

#: Training FLOPs per image as a multiple of the forward FLOPs: the backward pass costs two
#: matmuls for each one of the forward (Kaplan et al. 2020, Sec. 2.1).
TRAIN_FLOPS_PER_FORWARD = 3


def on_cuda(accelerator: str | None) -> bool:
    """Whether ``trainer.accelerator`` trains on CUDA here (``auto`` picks CUDA when present)."""
    return accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()


def images_per_step(cfg: DictConfig) -> int:
    """Images per optimiser step over all processes: batch x devices x nodes x accumulation."""
    trainer, devices = cfg.trainer, cfg.trainer.get("devices", 1)
    if isinstance(devices, (list, ListConfig)):
        devices = len(devices)
    elif devices in ("auto", -1, "-1"):
        devices = torch.cuda.device_count() if on_cuda(trainer.get("accelerator")) else 1
    return cfg.data.batch_size * int(devices) * int(trainer.get("num_nodes") or 1) * int(
        trainer.get("accumulate_grad_batches") or 1)


def measure_images_per_s(net: torch.nn.Module, cfg: DictConfig, image_size: int, channels: int,
                         steps: int = 10, warmup: int = 3) -> dict[str, Any]:
    """``measured_images_per_s`` (and the ``device``) of training steps of a copy of ``net``
    (forward, loss, backward, the configured optimiser's step) on one device of the trainer's
    kind, in its precision, through Lightning Fabric; the run's own network and random state are
    left untouched."""
    import hydra
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1, precision=cfg.trainer.precision)
    probe = copy.deepcopy(net).to(fabric.device).train()
    optimizer = hydra.utils.instantiate(cfg.optimizer)(probe.parameters())
    batch = cfg.data.batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, channels, image_size, image_size, generator=generator).to(fabric.device)
    labels = torch.randint(0, cfg.data.num_classes, (batch,), generator=generator).to(fabric.device)
    sync = torch.cuda.synchronize if fabric.device.type == "cuda" else (lambda: None)
    with torch.random.fork_rng(devices=[fabric.device] if fabric.device.type == "cuda" else []):
        for step in range(warmup + steps):
            if step == warmup:
                sync()
                start = time.perf_counter()
            with fabric.autocast():
                loss = F.cross_entropy(probe(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
    rate = steps * batch / (time.perf_counter() - start)
    return {"measured_images_per_s": round(rate, 1), "device": machine_name(cfg.trainer.get("accelerator", "auto"))}


def plan(cfg: DictConfig, flops_per_image: int, measure=None, previous: dict | None = None) -> dict[str, Any] | None:
    """The run's budget as metrics.json records it (``steps``, ``images``, ``train_flops`` and the
    budget given), or None without one. ``measure()`` gives the images/s of ``budget.minutes``; a
    resumed run keeps the steps its first attempt planned (``previous``)."""
    budget = cfg.get("budget") or {}
    flops, minutes = budget.get("flops"), budget.get("minutes")
    if flops is None and minutes is None:
        return None
    if flops is not None and minutes is not None:
        raise ValueError(f"budget.flops={flops} and budget.minutes={minutes} are both set: keep one, the other null.")
    name, value = ("flops", flops) if flops is not None else ("minutes", minutes)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"budget.{name}={value!r} must be a number above 0 (e.g. budget.{name}="
                         f"{'1e15' if name == 'flops' else '30'}), or null for trainer.max_epochs.")
    per_step = images_per_step(cfg)
    step_flops = TRAIN_FLOPS_PER_FORWARD * flops_per_image * per_step
    record: dict[str, Any] = {name: float(value)}
    if previous and previous.get(name) == float(value):
        record = dict(previous)
    elif name == "flops":
        record["steps"] = max(1, round(value / step_flops))
    else:
        record |= measure()
        record["steps"] = max(1, int(value * 60 * record["measured_images_per_s"] / per_step))
    return record | {"images": record["steps"] * per_step, "train_flops": record["steps"] * step_flops}


def machine_name(accelerator: str | None) -> str:
    """What a run's times are measured on: the GPU where it trains on CUDA, else the CPU and its threads."""
    if on_cuda(accelerator):
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    return f"{cpu_name()}, {threads} thread{'s' if threads > 1 else ''}"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
