"""Shared fixtures: where the real datasets are, and how to run the entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitlab.config import register_resolvers

# What every entry point does before Hydra composes: the in-process tests compose too.
register_resolvers()

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "conf"


def _data_dir() -> Path:
    """VITLAB_DATA_DIR, else the read-only shared datasets beside the checkout."""
    return Path(os.environ.get("VITLAB_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not (path / "FashionMNIST" / "raw").is_dir():
        pytest.fail(f"the real datasets are expected in {path} (set VITLAB_DATA_DIR)")
    return path


def run_entry(module: str, *overrides: str, cwd: Path, data_dir: Path, check: bool = True, env: dict | None = None):
    """Run ``python -m <module> <overrides>`` as a user would, in ``cwd``."""
    full_env = {**os.environ, "VITLAB_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("VITLAB_OUTPUT_DIR", None)
    result = subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {' '.join(overrides)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


# Overrides that make a real Fashion-MNIST run take seconds.
SLICE = (
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "data.batch_size=64",
    "data.eval_batch_size=128",
    "model.dim=32",
    "model.depth=2",
    "model.heads=2",
    "model.dim_head=16",
    "model.mlp_dim=64",
)
