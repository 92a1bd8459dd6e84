"""Multiruns: job folders named by what the sweep varies, progress lines, a summary at the
end, and jobs that stay jobs under DDP.

Hydra's ``override_dirname`` names a job by *all* its overrides, which soon passes the
file-name limit and buries the swept values among fixed ones. Here a job's folder is
``<job num>_<key>=<value>,...`` with the swept keys only: the parent process of a multirun (a
Hydra callback) knows them, and Hydra composes every job from the parent's
``hydra.overrides.hydra`` plus the job's own overrides, under any launcher; so the callback adds
an override of ``hydra.sweep.subdir`` there, with the keys as an argument of ``vitlab.job_dirname``.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Iterable
from contextlib import contextmanager

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from vitlab.rundir import read_metrics

MAX_DIRNAME = 160
#: The job folder's name in conf/hydra/default.yaml's ``hydra.sweep.subdir``: the callback adds the swept keys.
DIRNAME = "${vitlab.job_dirname:${hydra.overrides.task}}"
#: What Lightning's DDP launcher sets in its own environment for the ranks it starts.
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


def job_dirname(task_overrides: Iterable[str], swept: Iterable[str] | None = None) -> str:
    """``key=value`` pairs of this job's ``swept`` overrides, joined by commas (OmegaConf resolver).

    Without ``swept`` (the callback not installed) every override is used. Slashes become ``-``
    so a value never opens a sub-folder; a name past the file-name limit is shortened and made
    unique with a hash.
    """
    overrides = [str(o) for o in task_overrides]
    if swept is not None:
        keys = set(swept)
        overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys]
    name = ",".join(sorted(overrides)).replace("/", "-") or "default"
    if len(name) > MAX_DIRNAME:
        name = f"{name[:MAX_DIRNAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


@contextmanager
def sweep_job(output_dir: str):
    """Scope of one job of a multirun that runs in the sweep's own process.

    Lightning's DDP launcher starts the other ranks as ``python -m vitlab.train <sys.argv[1:]>
    hydra.run.dir=<hydra.run.dir>`` and has no public way to be given another command: inside a
    multirun those would be the whole sweep again, in a new folder. For the job's duration they
    are this job's overrides and folder (``run.dir`` of this job's own Hydra config, which Hydra
    composes afresh for the next job). The launcher's rendezvous variables (``DDP_ENV``) are put
    back afterwards, or the next job would think a launcher had started it.
    """
    hydra_cfg = HydraConfig.get()
    saved_argv, saved_env = sys.argv, {key: os.environ[key] for key in DDP_ENV if key in os.environ}
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
        for key in DDP_ENV:
            os.environ.pop(key, None)
        os.environ.update(saved_env)


def count_jobs(config: DictConfig) -> int | None:
    """How many jobs the multirun will launch: the sweeper's n_trials (Optuna), else the size of
    the grid of ``hydra.sweeper.params`` and the command line (a later value of a key wins)."""
    n_trials = OmegaConf.select(config, "hydra.sweeper.n_trials")
    if n_trials:
        return int(n_trials)
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    overrides = [*(f"{k}={v}" for k, v in params.items()), *config.hydra.overrides.task]
    sizes = {}
    try:
        for o in OverridesParser.create().parse_overrides(overrides):
            sizes[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
    except Exception:  # noqa: BLE001 - a sweep syntax only another sweeper knows (interval, glob): no count
        return None
    return math.prod(sizes.values())


class SweepCallback(Callback):
    """Hydra callback for multiruns.

    In the parent process: names the jobs' folders by the swept keys (see the module's
    docstring) and counts the jobs; at the end writes the summary and exits non-zero if any job
    failed. Around each job: prints ``job k/N``, then the job's status and key metric. What
    ``on_multirun_start`` notes on this object reaches the jobs with it: Hydra hands its
    callbacks to every job, pickled along for launchers that run jobs in other processes.
    """

    keys: list[str] | None = None
    jobs: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from vitlab.results import swept_keys  # here: the jobs need no pandas

        params = OmegaConf.select(config, "hydra.sweeper.params")
        params = OmegaConf.to_container(params) if params is not None else None
        self.keys, self.jobs = swept_keys(config.hydra.overrides.task, params), count_jobs(config)
        subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"]
        if DIRNAME in subdir:  # not a subdir of the user's own
            swept = "[" + ",".join(f"'{k}'" for k in self.keys) + "]"
            named = subdir.replace(DIRNAME, f"{DIRNAME[:-1]},{swept}}}")
            with read_write(config.hydra.overrides):
                config.hydra.overrides.hydra.append(f'hydra.sweep.subdir="{named}"')

    def _label(self, config: DictConfig) -> str:
        return f"job {config.hydra.job.num + 1}/{self.jobs or '?'}: {job_dirname(config.hydra.overrides.task, self.keys)}"

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            print(f"{self._label(config)} started", flush=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        metrics = read_metrics(config.hydra.runtime.output_dir)
        status = metrics.get("status", "failed" if job_return.status == JobStatus.FAILED else "unknown")
        detail = metrics.get("error", "") if status == "failed" else ", ".join(
            f"{key}={metrics[key]:.4f}" for key in ("best_val_acc", "test/acc") if isinstance(metrics.get(key), float))
        print(f"{self._label(config)} {status}" + (f": {detail}" if detail else ""), flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """Summarise the sweep (vitlab.summarize); a failure here never hides the jobs' results.
        Exits with status 1 if any job failed (the jobs themselves do not raise, so that every
        job runs and the summary is written)."""
        try:
            from vitlab.summarize import summarize  # here: the jobs need neither pandas nor matplotlib

            runs = summarize(config.hydra.sweep.dir)
        except Exception as error:  # noqa: BLE001
            print("warning: no sweep summary: " + f"{type(error).__name__}: {error}".splitlines()[0])
            return
        failed = list(runs.loc[runs["status"] == "failed", "job"])
        if failed:
            print(f"{len(failed)} of {len(runs)} jobs failed: {', '.join(failed)}", file=sys.stderr, flush=True)
            sys.exit(1)
