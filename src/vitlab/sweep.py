"""Multirun job folders named by what the sweep varies.

Hydra's ``override_dirname`` names a job by *all* its overrides, which soon passes the
file-name limit and buries the swept values among fixed ones. Here the parent process of a
multirun (a Hydra callback) notes which keys are swept, and each job's folder is named
``<job num>_<key>=<value>,...`` with those keys only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

SWEPT_KEYS_ENV = "VITLAB_SWEPT_KEYS"
MAX_DIRNAME = 160


def swept_keys(overrides: Iterable[str], sweeper_params: dict | None = None) -> list[str]:
    """Keys that take several values: comma lists, ranges and choice() on the command line,
    and the search space of ``hydra.sweeper.params``."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    keys = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    keys += [k for k in (sweeper_params or {}) if k not in keys]
    return keys


def job_dirname(task_overrides: Iterable[str]) -> str:
    """``key=value`` pairs of this job's swept overrides, joined by commas (OmegaConf resolver).

    Without a recorded sweep (the callback not installed) every override is used. Slashes
    become ``-`` so a value never opens a sub-folder; a name past the file-name limit is
    shortened and made unique with a hash.
    """
    overrides = [str(o) for o in task_overrides]
    recorded = os.environ.get(SWEPT_KEYS_ENV)
    if recorded is not None:
        keys = set(filter(None, recorded.split(",")))
        overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys]
    name = ",".join(sorted(overrides)).replace("/", "-") or "default"
    if len(name) > MAX_DIRNAME:
        name = f"{name[:MAX_DIRNAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


class SweepCallback(Callback):
    """Hydra callback in the multirun's parent process: records the swept keys for the jobs'
    folder names (launchers in other processes inherit the environment)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        params = OmegaConf.select(config, "hydra.sweeper.params")
        params = OmegaConf.to_container(params) if params is not None else None
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(config.hydra.overrides.task, params))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """Summarise the sweep (vitlab.summarize); a failure here never hides the jobs' results."""
        try:
            from vitlab.summarize import summarize  # here: the jobs need neither matplotlib nor tensorboard

            summarize(config.hydra.sweep.dir)
        except Exception as error:  # noqa: BLE001
            print("warning: no sweep summary: " + f"{type(error).__name__}: {error}".splitlines()[0])
