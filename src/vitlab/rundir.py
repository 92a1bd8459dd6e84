"""The run folder's ``metrics.json``: one place for its name, reading and atomic writing.

Light on purpose (no torch), so sweep callbacks and summaries can use it."""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_FILE = "metrics.json"
#: Where ModelCheckpoint(save_last) and CheckpointOnSigterm leave the checkpoint a re-run resumes from.
LAST_CHECKPOINT = "checkpoints/last.ckpt"


def read_metrics(run_dir: str | Path) -> dict:
    """The run folder's ``metrics.json``, or ``{}`` if there is none (or it is unreadable)."""
    try:
        return json.loads((Path(run_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, payload: dict) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
