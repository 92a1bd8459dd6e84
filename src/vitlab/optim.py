"""LR schedules built from torch's own schedulers, configured in ``conf/scheduler/``."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05,
                  warmup_start_factor: float = 0.01, min_lr_ratio: float = 0.0,
                  warmup_steps: int | None = None) -> LRScheduler:
    """Linear warmup over ``warmup_steps`` optimiser steps (null: ``warmup_fraction`` of them),
    then cosine decay to ``min_lr_ratio`` x the base rate at the last step; stepped once per
    optimiser step. A warmup longer than the run (a shortened ``debug=fast`` run of a long
    recipe) is cut to the run's length less one step."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"scheduler.warmup_fraction={warmup_fraction} must be in [0, 1).")
    if warmup_steps is not None and (isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps
                                     or warmup_steps < 0):
        raise ValueError(f"scheduler.warmup_steps={warmup_steps} must be a whole number of steps >= 0 "
                         f"(null: scheduler.warmup_fraction of the run).")
    total_steps = max(int(total_steps), 1)
    warmup = round(warmup_fraction * total_steps) if warmup_steps is None else min(int(warmup_steps), total_steps - 1)
    base_lr = optimizer.param_groups[0]["lr"]
    cosine = CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1), eta_min=base_lr * min_lr_ratio)
    if warmup == 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, schedulers=[ramp, cosine], milestones=[warmup])


def constant(optimizer: Optimizer, total_steps: int) -> LRScheduler:
    """No schedule: the base rate throughout (``total_steps`` is accepted and unused)."""
    return ConstantLR(optimizer, factor=1.0, total_iters=0)
