"""Run folders as one table: ``load_runs`` gives a pandas DataFrame with a row per job, and
``group_stats`` the mean ± sample std over seeds of each setting. Summaries, the ablation report
and the tests read results through here (no torch, no matplotlib: it stays light)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from pandas.api.types import is_bool, is_number

from vitlab.rundir import METRICS_FILE, read_metrics

#: What ``python -m vitlab.analyze`` writes into its own folder (one per analysed checkpoint).
ANALYSIS_FILE = "analysis.json"

#: metrics.json field -> column, in column order (summary.csv: the job, the swept keys, these).
FIELDS = {field: field.replace("/", "_") for field in (
    "status", "error", "params", "flops_per_image", "train_images_per_s", "best_val_acc", "test/acc", "test/loss",
    "epochs", "wall_time_s")}
#: What group_stats aggregates by default: mean ± std over the completed jobs of each setting.
STATS = ("best_val_acc", "test_acc", "wall_time_s", "train_images_per_s")


def swept_keys(overrides: Iterable[str], sweeper_params: dict | None = None) -> list[str]:
    """Keys that take several values: comma lists, ranges and choice() on the command line,
    and the search space of ``hydra.sweeper.params``."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    keys = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    return keys + [k for k in (sweeper_params or {}) if k not in keys]


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Direct subfolders with a ``metrics.json`` or ``.hydra/``, in job-number order."""
    jobs = [
        p for p in Path(sweep_dir).iterdir()
        if p.is_dir() and not p.name.startswith(".") and ((p / METRICS_FILE).is_file() or (p / ".hydra").is_dir())
    ]
    return sorted(jobs, key=lambda p: (int(n) if (n := p.name.partition("_")[0]).isdigit() else float("inf"), p.name))


def job_overrides(job: Path) -> dict[str, Any]:
    """The job's command-line overrides, ``{key: typed value}`` (4, 0.001, "adamw")."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    overrides = {}
    for override in OverridesParser.create().parse_overrides(yaml.safe_load(path.read_text()) or []):
        value = override.value()
        if not (value is None or isinstance(value, (str, int, float))):
            value = override.get_value_element_as_str()  # lists and dicts as written, so they can be grouped on
        overrides[override.get_key_element().lstrip("+~")] = value
    return overrides


def sweep_overrides(sweep_dir: Path) -> list[str]:
    """The multirun's command-line overrides as typed (``model.patch_size=4,7``), from
    Hydra's ``multirun.yaml``; empty without one."""
    path = Path(sweep_dir) / "multirun.yaml"
    parent = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    return list(((parent.get("hydra") or {}).get("overrides") or {}).get("task") or [])


def network_name(run: Path) -> str | None:
    """The network a run trained, as its ``config.yaml`` names it (``model.name``: ``simple_vit``,
    ``deit_tiny_patch16_224``, ...); a run recorded before models had names trained SimpleViT (or
    the ``_target_`` it names). None without a config.yaml."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        return None
    try:
        model = (yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}).get("model")
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(model, dict):
        return None
    target = model.get("_target_")
    return model.get("name") or (NEUTRAL["model"]["name"] if target == "vitlab.models.SimpleViT" else target)


def _record(job: Path) -> dict[str, Any]:
    """The FIELDS columns, then every other field of the job's metrics.json; status ``missing``
    without one, ``unreadable`` when it is not a JSON object."""
    metrics = read_metrics(job)
    if not isinstance(metrics, dict) or not metrics:
        missing = not (job / METRICS_FILE).exists()
        metrics = {"status": "missing"} if missing else {"status": "unreadable", "error": f"{METRICS_FILE}: not a JSON object"}
    row = {column: metrics.get(field) for field, column in FIELDS.items()}
    return row | {"status": row["status"] or "unknown"} | {k: v for k, v in metrics.items() if k not in FIELDS}


def analyses(folders: str | Path | Iterable[str | Path]) -> dict[Path, dict[str, Any]]:
    """``{run folder: summary}`` of the ``vitlab.analyze`` results below ``folders`` (at any depth):
    each ``analysis.json`` names the run folder its checkpoint came from (``run_dir``) and holds a
    ``summary`` of scalars. Where a run was analysed more than once, the newest file wins."""
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    found: dict[Path, tuple[float, dict[str, Any]]] = {}
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"analysis={folder} is not a folder: name the folder python -m vitlab.analyze "
                                    f"wrote (outputs/analyze/<date>/<time>, or outputs/analyze to search them all).")
        for path in folder.rglob(ANALYSIS_FILE):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(record, dict) or not record.get("run_dir") or not isinstance(record.get("summary"), dict):
                continue  # a sweep's own record, or not an analysis
            run, when = Path(record["run_dir"]).resolve(), path.stat().st_mtime
            if run not in found or when > found[run][0]:
                found[run] = (when, record["summary"])
    return {run: summary for run, (_, summary) in found.items()}


def load_runs(runs: str | Path | Iterable[str | Path], keys: Sequence[str] = (),
              analysis: str | Path | Iterable[str | Path] | None = None) -> pd.DataFrame:
    """A row per job: ``job`` (its folder's name), the swept keys, the ``FIELDS`` columns, the other
    fields of metrics.json (``history``, ...), and ``dir``.

    ``runs`` is a sweep folder (its job folders) or any run folders. The swept keys are ``keys``,
    then those swept on the sweep's command line (known before every job has run), then any other
    override that differs between the jobs (e.g. a sweeper's choice); ``key_columns`` names them.
    Where the jobs trained different networks, ``model.name`` is one of them (after ``model``), as
    each job's config.yaml names its network (``network_name``): in ``-m model=simple_vit,timm
    model.name=deit_tiny_patch16_224`` the SimpleViT job's is ``simple_vit``.

    ``analysis``: folders written by ``python -m vitlab.analyze`` (``sweep=`` or ``ckpt_path=``), which
    never writes into the run folders; the ``summary`` of the analysis of each job's checkpoint
    (``analyses``) adds its columns (``mean_attention_distance``, ``token_norm_max_over_median``, ...)
    after the metrics.json fields, missing for a job not analysed. None (the default) adds nothing.
    """
    if isinstance(runs, (str, Path)):
        dirs, keys = job_dirs(Path(runs)), [*keys, *swept_keys(sweep_overrides(Path(runs)))]
    else:
        dirs = [Path(run) for run in runs]
    overrides = [job_overrides(run) for run in dirs]
    known = [o for o in overrides if o]  # a job folder without .hydra/ says nothing
    # (optuna.*, which trial a job of a search is, names no setting.)
    varying = [k for k in dict.fromkeys(k for o in known for k in o)
               if len({repr(o.get(k)) for o in known}) > 1 and not k.startswith("optuna.")]
    keys = list(dict.fromkeys([*keys, *varying]))
    networks = [network_name(run) for run in dirs]
    if len({n for n in networks if n is not None}) > 1 or "model.name" in keys:
        keys = [k for k in keys if k != "model.name"]
        keys.insert(keys.index("model") + 1 if "model" in keys else 0, "model.name")
    found = analyses(analysis) if analysis is not None else {}
    names = list(dict.fromkeys(k for summary in found.values() for k in summary))
    rows = []
    for run, o, network in zip(dirs, overrides, networks):
        row = {"job": run.name} | {k: o.get(k) for k in keys}  # a key's value is the override's (metrics.json has seed)
        if "model.name" in row and network is not None:
            row["model.name"] = network  # the network the job built, whatever the override said
        row |= {k: v for k, v in _record(run).items() if k not in row}
        summary = found.get(run.resolve(), {})
        row |= {k: summary.get(k) for k in names if k not in row}
        rows.append(row | {"dir": run})
    # Built from Python objects, then typed per column: ints stay ints (Int64) beside missing values.
    return pd.DataFrame(rows, dtype=object).convert_dtypes()


def key_columns(runs: pd.DataFrame) -> list[str]:
    """The swept keys of a ``load_runs`` table: its columns between ``job`` and ``status``."""
    return list(runs.columns[1 : runs.columns.get_loc("status")])


def _order(value: Any) -> tuple:
    """Sort key for mixed values: numbers by value, then text, then missing."""
    if pd.isna(value):
        return (2, 0, "")
    return (0, value, "") if is_number(value) and not is_bool(value) else (1, 0, str(value))


def group_stats(runs: pd.DataFrame, keys: Sequence[str], metrics: Iterable[str] = STATS) -> pd.DataFrame:
    """A row per setting of ``keys`` (the swept keys but the seed), sorted by value: the keys,
    ``jobs``, ``completed``, and per metric ``<metric>_mean``, ``<metric>_std`` (sample, n - 1) and
    ``<metric>_n`` over the setting's completed jobs."""
    keys, metrics = list(keys), list(metrics)
    completed = runs["status"].eq("completed")
    numbers = runs.reindex(columns=metrics).apply(pd.to_numeric, errors="coerce").astype(float).where(completed, axis=0)
    grouped = numbers.assign(jobs=1, completed=completed.astype(int)).groupby(
        [runs[k] for k in keys] or (lambda _: 0), sort=False, dropna=False
    )
    stats = grouped[metrics].agg(["mean", "std", "count"])
    stats.columns = [f"{metric}_{'n' if stat == 'count' else stat}" for metric, stat in stats.columns]
    stats = grouped[["jobs", "completed"]].sum().join(stats).reset_index(drop=not keys)
    return stats.sort_values(keys, key=lambda column: column.map(_order)).reset_index(drop=True) if keys else stats


#: Config fields that do not decide a run's result: where it reads and writes, how it is named,
#: logged and shown, how many threads and workers it uses, whether it is compiled (and, in any
#: section, Hydra's ``_convert_``, how instantiate passes lists). Two runs equal in everything
#: else are the same experiment (``identical_run``).
INCIDENTAL = {
    "": ("task_name", "tags", "torch_threads", "compile", "ckpt_path", "resume", "name", "sweep", "paths", "logger",
         "optimized_metric", "reuse", "hydra"),
    "data": ("data_dir", "num_workers", "pin_memory", "persistent_workers", "download", "cache_dir"),
    "trainer": ("default_root_dir", "enable_progress_bar", "log_every_n_steps"),
}


#: Fields added since runs were first recorded, at the value that keeps what runs did before: a
#: config with them at that value is the same experiment as one recorded without them.
NEUTRAL = {
    # (model.name: runs recorded before models had names trained SimpleViT.)
    "model": {"name": "simple_vit", "reg_tokens": 0, "qk_norm": False, "layer_scale": None, "mlp": "gelu",
              "patch_dropout": 0.0, "patch_norm": True, "flexi_patch_sizes": None, "positions": "extend"},
    "module": {"test_image_sizes": [], "test_patch_sizes": None, "layer_decay": None, "freeze": "none"},
    "data": {"train_subset": None},
    # Top-level fields: fine-tuning's start.
    "": {"init_from": None, "init": {"head": "reset"}},
}
#: Top-level sections that decide nothing while off: the probes of frozen features (they add
#: metrics, never change training) and the Optuna trial.
NEUTRAL_SECTIONS = {"probe": lambda section: section.get("every_n_epochs") is None,
                    # Not a trial of an Optuna search (a trial's job reports to it and may be pruned).
                    "optuna": lambda section: section.get("trial") is None}


def deciding_config(config: dict) -> dict:
    """A resolved config (a plain dict) less its ``INCIDENTAL`` fields, the callbacks' folders,
    and the ``NEUTRAL`` fields at their neutral value."""
    def plain(node):
        return {k: plain(v) for k, v in node.items() if k != "_convert_"} if isinstance(node, dict) else node

    config = {k: v for k, v in plain(config).items() if k not in INCIDENTAL[""]
              and not (k in NEUTRAL[""] and v == NEUTRAL[""][k])
              and not (k in NEUTRAL_SECTIONS and isinstance(v, dict) and NEUTRAL_SECTIONS[k](v))}
    for section, fields in NEUTRAL.items():
        if section and isinstance(config.get(section), dict):
            config[section] = {k: v for k, v in config[section].items()
                               if not (k in fields and (v == fields[k] or v in ([], None) and fields[k] in ([], None)))}
    if isinstance(config.get("module"), dict) and config["module"].get("seed") == config.get("seed"):
        config["module"] = {k: v for k, v in config["module"].items() if k != "seed"}
    for section in ("data", "trainer"):
        if isinstance(config.get(section), dict):
            config[section] = {k: v for k, v in config[section].items() if k not in INCIDENTAL[section]}
    if isinstance(config.get("callbacks"), dict):
        config["callbacks"] = {name: {k: v for k, v in c.items() if k != "dirpath"} if isinstance(c, dict) else c
                               for name, c in config["callbacks"].items()}
    return config


def identical_run(config: dict, folder: str | Path, exclude: Path | None = None) -> Path | None:
    """The first completed run below ``folder`` (a folder with ``metrics.json`` and the
    ``config.yaml`` of a vitlab.train run, at any depth) whose config equals ``config`` in every
    field that decides the result (``deciding_config``), or None. Not ``exclude``, nor one that
    itself took another's results."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"reuse={folder} is not a folder: name a folder of earlier runs "
                                "(scripts/ablate.sh uses docs/ablations/runs), or reuse=null.")
    wanted = deciding_config(config)
    for path in sorted(Path(folder).rglob(METRICS_FILE)):
        run = path.parent
        metrics = read_metrics(run)
        if (run.resolve() == (exclude.resolve() if exclude else None) or metrics.get("status") != "completed"
                or metrics.get("reused_from") or not (run / "config.yaml").is_file()):
            continue
        if deciding_config(yaml.safe_load((run / "config.yaml").read_text()) or {}) == wanted:
            return run
    return None
