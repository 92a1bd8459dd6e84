"""Experiment trackers beside TensorBoard: what a run tells them at its start and end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def run_started(loggers: list, cfg: DictConfig) -> None:
    """Called once a training run's trainer is set up (rank 0)."""


def run_ended(loggers: list, run_dir: Path, record: dict[str, Any]) -> None:
    """Called when a training run's record is closed (rank 0), with its final ``metrics.json``."""
