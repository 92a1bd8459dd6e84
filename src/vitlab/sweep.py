"""Multiruns: job folders named by what the sweep varies, progress lines, a summary at the
end, and jobs that stay jobs under DDP.

Hydra's ``override_dirname`` names a job by *all* its overrides, which soon passes the
file-name limit and buries the swept values among fixed ones. Here the parent process of a
multirun (a Hydra callback) notes which keys are swept, and each job's folder is named
``<job num>_<key>=<value>,...`` with those keys only.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable
from contextlib import contextmanager

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from vitlab.rundir import read_metrics

SWEPT_KEYS_ENV = "VITLAB_SWEPT_KEYS"
SWEPT_JOBS_ENV = "VITLAB_SWEEP_JOBS"
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


@contextmanager
def sweep_job(output_dir: str):
    """Scope of one job of a multirun that runs in the sweep's own process.

    Lightning's DDP launcher starts the other ranks as ``python -m vitlab.train <sys.argv[1:]>
    hydra.run.dir=<hydra.run.dir>``: inside a multirun those would be the whole sweep again, in
    a new folder. Here they are this job's overrides and folder. The launcher also leaves its
    rendezvous variables (LOCAL_RANK, WORLD_SIZE, ...) in the environment, which would make the
    next job think it was started by a launcher: the environment is restored afterwards.
    """
    hydra_cfg = HydraConfig.get()
    saved_argv, saved_env, saved_dir = list(sys.argv), dict(os.environ), hydra_cfg.run.dir
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = output_dir
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = saved_dir


def count_jobs(config: DictConfig) -> int | None:
    """How many jobs the multirun will launch: the sweeper's n_trials (Optuna), else the size of
    the grid of the command line and ``hydra.sweeper.params``."""
    n_trials = OmegaConf.select(config, "hydra.sweeper.n_trials")
    if n_trials:
        return int(n_trials)
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    overrides = [*config.hydra.overrides.task, *(f"{k}={v}" for k, v in params.items())]
    try:
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    except Exception:  # noqa: BLE001 - a sweep syntax only another sweeper knows: no count
        return None
    return len(batches[0]) if batches else None


def _job_label(config: DictConfig) -> str:
    total = os.environ.get(SWEPT_JOBS_ENV) or "?"
    return f"job {config.hydra.job.num + 1}/{total}: {job_dirname(config.hydra.overrides.task)}"


class SweepCallback(Callback):
    """Hydra callback for multiruns.

    In the parent process: records the swept keys (for the jobs' folder names) and the number
    of jobs (launchers in other processes inherit the environment); at the end writes the
    summary and exits non-zero if any job failed. Around each job: prints ``job k/N``, then the
    job's status and key metric.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        params = OmegaConf.select(config, "hydra.sweeper.params")
        params = OmegaConf.to_container(params) if params is not None else None
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(config.hydra.overrides.task, params))
        os.environ[SWEPT_JOBS_ENV] = str(count_jobs(config) or "")

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            print(f"{_job_label(config)} started", flush=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        metrics = read_metrics(config.hydra.runtime.output_dir)
        status = metrics.get("status", "failed" if job_return.status == JobStatus.FAILED else "unknown")
        if status == "failed":
            detail = metrics.get("error", "")
        else:
            detail = ", ".join(
                f"{key}={metrics[key]:.4f}" for key in ("best_val_acc", "test/acc") if isinstance(metrics.get(key), float)
            )
        print(f"{_job_label(config)} {status}" + (f": {detail}" if detail else ""), flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """Summarise the sweep (vitlab.summarize); a failure here never hides the jobs' results.
        Exits with status 1 if any job failed (the jobs themselves do not raise, so that every
        job runs and the summary is written)."""
        rows = []
        try:
            from vitlab.summarize import summarize  # here: the jobs need neither matplotlib nor tensorboard

            rows = summarize(config.hydra.sweep.dir)
        except Exception as error:  # noqa: BLE001
            print("warning: no sweep summary: " + f"{type(error).__name__}: {error}".splitlines()[0])
        failed = [row["job"] for row in rows if row.get("status") == "failed"]
        if failed:
            print(f"{len(failed)} of {len(rows)} jobs failed: {', '.join(failed)}", file=sys.stderr, flush=True)
            sys.exit(1)
