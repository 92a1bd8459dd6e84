"""Every error a user causes and fixes, and the one policy for them at the entry points.

A user error (a config value, data on disk, a checkpoint, a diverging learning rate) ends a
command with one line, ``error: <what and the fix>``, and exit status 1; anything else is a bug
and keeps its traceback. Train, eval, predict and prepare all go through ``entry_point``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class DataError(RuntimeError):
    """A problem with the data on disk that the user can fix; the message says how."""


class BadImageError(DataError):
    """An image that cannot be read or decoded (``data.on_bad_file`` decides what follows)."""


class CheckpointError(ValueError):
    """A ``ckpt_path`` that is not a checkpoint, or from another model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that asks to import and call code when loaded."""


#: Errors a user causes and fixes; a config mistake is a ValueError.
USER_ERRORS = (ValueError, DataError, FloatingPointError, FileNotFoundError)


def first_line(error: BaseException, limit: int = 160) -> str:
    """An error's reason in a few words, for a message that quotes it: an OS error's own
    (``[Errno 111] Connection refused``), else its first line (its type's name if it has no text),
    cut to ``limit`` characters."""
    text = str(error).strip()
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    line = errno.group(0) if errno else (text.splitlines() or [type(error).__name__])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def failure_reason(error: BaseException) -> tuple[BaseException, str]:
    """The root cause (Hydra's InstantiationException wraps the real error) and its first line."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    return root, f"{type(root).__name__}: {root}".strip().splitlines()[0]


def _log_to_files(text: str) -> str | None:
    """``text`` into the root logger's files only (Hydra's ``<task>.log``); the first one's path."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    record = logging.makeLogRecord({"name": __name__, "levelno": logging.ERROR, "levelname": "ERROR", "msg": text})
    for handler in files:
        handler.handle(record)
    return files[0].baseFilename if files else None


def close_progress_bars() -> None:
    """Close the progress bars still open (Lightning's tqdm bars, which an exception leaves in the
    middle of a line): each ends its line, so that a message printed next starts its own."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot be drawn any more is left as it is
            pass
    sys.stdout.flush()


def close_matches(word: str, choices, prefix: str = "") -> list[str]:
    """Up to three of ``choices`` close to a mistyped ``word``, each after ``prefix``, for a
    message's "did you mean"."""
    import difflib

    return [prefix + c for c in difflib.get_close_matches(str(word), [str(c) for c in choices], n=3, cutoff=0.6)]


def flatten_hydra_message(error: BaseException) -> str:
    """One line of a Hydra composition error: its paragraphs joined, a list under a heading as
    ``heading: a, b, c``, its search-path listing left out, and the OmegaConf cause (``Key 'x' is
    not in struct``) with the keys close to the one asked for."""
    parts = [f"cannot parse the override {error.override!r}"] if getattr(error, "override", None) else []
    for block in re.split(r"\n\s*\n", str(error).split("Config search path")[0].strip()):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if lines[0].endswith(":") and len(lines) > 1:
            parts.append(f"{lines[0][:-1]}: {', '.join(lines[1:])}")
        else:
            parts.extend(lines)
    cause = error.__cause__
    if cause is not None and not isinstance(cause, type(error)):
        reason = first_line(cause)
        parent, key = getattr(cause, "parent_node", None), getattr(cause, "key", None)
        full_key = str(getattr(cause, "full_key", None) or "")
        prefix = full_key.rpartition(".")[0] + "." if "." in full_key else ""
        close = close_matches(key, parent.keys(), prefix) if key is not None and hasattr(parent, "keys") else []
        parts.insert(1, reason + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return "; ".join(part.rstrip(".") for part in parts) + "."


def hydra_errors_in_one_line() -> None:
    """Hydra reports a config it cannot compose (a bad override, an unknown config of a group, an
    override it cannot parse, a sweeper or launcher it cannot build) in several lines and a hint
    about HYDRA_FULL_ERROR; vitlab's commands say it as ``error: <one line>``, exit status 1, as
    every other user error. ``HYDRA_FULL_ERROR=1`` still shows Hydra's own report and traceback.
    Hydra has no hook for this: its reporting function is wrapped, and left alone if it moves."""
    import hydra._internal.utils as hydra_utils
    from hydra.errors import CompactHydraException, InstantiationException

    report = getattr(hydra_utils, "run_and_report", None)
    if report is None or getattr(report, "vitlab", False):
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        def composed() -> Any:
            try:
                return func()
            except (CompactHydraException, InstantiationException) as error:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                if isinstance(error, InstantiationException):
                    message = failure_reason(error)[1]
                else:
                    message = flatten_hydra_message(error)
                print(f"error: {message}", file=sys.stderr)
                sys.exit(1)

        return report(composed)

    run_and_report.vitlab = True
    hydra_utils.run_and_report = run_and_report


def entry_point(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The failure policy of every ``python -m vitlab.<command>``, around its Hydra task: a user
    error prints ``error: <reason>`` and the log file that keeps the traceback, exit status 1; in
    a multirun a failed job is logged and the sweep goes on (``vitlab.sweep`` exits non-zero at
    the end); SIGTERM (preemption) exits with 143, naming how to resume; anything else is a bug
    and keeps its traceback. A progress bar still drawing is closed first: the message starts
    its own line. Errors Hydra meets before the task, in composing its config, are one line too
    (``hydra_errors_in_one_line``)."""
    hydra_errors_in_one_line()

    @functools.wraps(task)
    def run(cfg):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            return task(cfg)
        except SIGTERMException:
            close_progress_bars()
            last = Path(HydraConfig.get().runtime.output_dir) / "checkpoints" / "last.ckpt"
            hint = f"; resume with the same name=/sweep= or ckpt_path={last}" if last.is_file() else ""
            print(f"interrupted by SIGTERM{hint}", file=sys.stderr)
            sys.exit(143)
        except Exception as error:
            close_progress_bars()
            root, reason = failure_reason(error)
            multirun = HydraConfig.get().mode == RunMode.MULTIRUN
            if not (multirun or isinstance(root, USER_ERRORS)):
                raise  # a bug: Hydra prints and logs its traceback
            kept = _log_to_files(traceback.format_exc())
            if multirun:
                logging.getLogger(__name__).error(f"job failed: {reason}")
                return None
            print(f"error: {reason}" + (f"\n(traceback in {kept})" if kept else ""), file=sys.stderr)
            sys.exit(1)

    return run
