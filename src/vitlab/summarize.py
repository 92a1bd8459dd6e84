"""Summarise a multirun: ``python -m vitlab.summarize outputs/multirun/<date>/<time>``.

Writes into the sweep folder ``summary.csv`` and ``summary.md`` (a row per job, and mean ± std
over seeds per setting of the other swept keys), ``metric_vs_<key>.png`` per swept numeric key,
``curves_all.png``, and each job's ``curves.png``; prints the grouped table. It reports what is
there, so it works on a sweep that is still running or partly failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from vitlab.rundir import METRICS_FILE
from vitlab.plots import plot_metric_vs_params, plot_run_curves, plot_sweep_curves
from vitlab.sweep import swept_keys

#: metrics.json field -> column, in column order.
FIELDS = {
    "status": "status",
    "error": "error",
    "params": "params",
    "flops_per_image": "flops_per_image",
    "train_images_per_s": "train_images_per_s",
    "best_val_acc": "best_val_acc",
    "test/acc": "test_acc",
    "test/loss": "test_loss",
    "epochs": "epochs",
    "wall_time_s": "wall_time_s",
}
#: Columns of the grouped table: mean ± std over the completed jobs of each setting.
STATS = ("best_val_acc", "test_acc", "wall_time_s", "train_images_per_s")
#: Number formats of the Markdown tables (the CSV keeps full precision).
FORMATS = {
    "best_val_acc": ".4f",
    "test_acc": ".4f",
    "test_loss": ".4f",
    "wall_time_s": ".1f",
    "train_images_per_s": ".1f",
}


class SweepNotFound(Exception):
    """The path is not a sweep folder with jobs; the message says why, in one sentence."""


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Direct subfolders with a ``metrics.json`` or ``.hydra/``, in job-number order."""
    jobs = [
        p for p in sweep_dir.iterdir()
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


def job_metrics(job: Path) -> dict[str, Any]:
    """The job's columns from ``metrics.json``: status ``missing`` without one, ``unreadable``
    (with the reason) when it is not a JSON object."""
    try:
        metrics = json.loads((job / METRICS_FILE).read_text())
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        metrics = {"status": "missing"}
    except (OSError, ValueError) as error:
        metrics = {"status": "unreadable", "error": f"{METRICS_FILE}: {error}"}
    row = {column: metrics.get(field) for field, column in FIELDS.items()}
    return row | {"status": row["status"] or "unknown"}


def sweep_overrides(sweep_dir: Path) -> list[str]:
    """The multirun's command-line overrides as typed (``model.patch_size=4,7``), from
    Hydra's ``multirun.yaml``; empty without one."""
    path = sweep_dir / "multirun.yaml"
    parent = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    return list(((parent.get("hydra") or {}).get("overrides") or {}).get("task") or [])


def find_swept_keys(task: list[str], overrides: list[dict[str, Any]]) -> list[str]:
    """Keys swept on the command line (``task``: known before every job has run), then any
    other key that takes several values across the jobs' ``overrides`` (e.g. a sweeper's choice)."""
    keys = swept_keys(task)
    known = [job for job in overrides if job]  # a job folder without .hydra/ says nothing
    seen = dict.fromkeys(key for job in known for key in job)
    return keys + [k for k in seen if k not in keys and len({repr(job.get(k)) for job in known}) > 1]


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation (n - 1; None below two values), n) of the values given."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _order(value: Any) -> tuple:
    """Sort key for mixed values: numbers by value, then text, then missing."""
    if _is_number(value):
        return (0, value, "")
    return (1, 0, str(value)) if value is not None else (2, 0, "")


def group_stats(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """One entry per setting of ``keys`` (the swept keys but the seed), sorted by value:
    ``{"setting": {key: value}, "jobs": n, "completed": n, "stats": {metric: (mean, std, n)}}``
    with the statistics of ``STATS`` over the setting's completed jobs."""
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k) for k in keys)].append(row)
    out = []
    for values in sorted(groups, key=lambda values: [_order(v) for v in values]):
        done = [r for r in groups[values] if r["status"] == "completed"]
        stats = {metric: mean_std(r.get(metric) for r in done) for metric in STATS}
        out.append(
            {"setting": dict(zip(keys, values)), "jobs": len(groups[values]), "completed": len(done), "stats": stats}
        )
    return out


def fmt(value: Any, column: str = "") -> str:
    if value is None:
        return "–"
    return format(value, FORMATS[column]) if isinstance(value, float) and column in FORMATS else str(value)


def fmt_stat(stat: tuple[float | None, float | None, int], column: str) -> str:
    """``0.9123 ± 0.0041 (n=3)``; a single value has no spread, none at all is ``–``."""
    mean, std, n = stat
    if not n:
        return "–"
    return f"{fmt(mean, column)} ± {fmt(std, column)} (n={n})" if std is not None else f"{fmt(mean, column)} (n=1)"


def md_table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell).replace("|", "\\|") for cell in line) + " |" for line in lines)


def write_plots(sweep_dir: Path, jobs: list[Path], groups: list[dict[str, Any]], numeric_keys: list[str]) -> list[Path]:
    """Each job's ``curves.png`` (again when its event files are newer), then the sweep's plots."""
    for job in jobs:
        events = [e.stat().st_mtime for e in job.glob("events.out.tfevents.*")]
        curves = job / "curves.png"
        if events and (not curves.exists() or curves.stat().st_mtime < max(events)):
            plot_run_curves(job)
    plots = [*plot_metric_vs_params(groups, numeric_keys, sweep_dir), plot_sweep_curves(jobs, sweep_dir)]
    return [p for p in plots if p is not None]


def grouped_table(groups: list[dict[str, Any]], keys: list[str]) -> str:
    cells = (
        [*map(fmt, g["setting"].values()), f"{g['completed']}/{g['jobs']}", *(fmt_stat(g["stats"][m], m) for m in STATS)]
        for g in groups
    )
    return md_table([*keys, "completed", *STATS], cells)


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write the sweep's tables and plots, print the grouped table; returns a row per job
    (``job``, the swept keys, then the ``FIELDS`` columns)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepNotFound(f"{sweep_dir} is not a folder.")
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise SweepNotFound(f"{sweep_dir} has no job folders (subfolders with {METRICS_FILE} or .hydra/).")

    overrides = [job_overrides(job) for job in jobs]
    task = sweep_overrides(sweep_dir)
    keys = find_swept_keys(task, overrides)
    rows = [{"job": job.name} | {k: o.get(k) for k in keys} | job_metrics(job) for job, o in zip(jobs, overrides)]
    group_keys = [k for k in keys if k != "seed"]
    groups = group_stats(rows, group_keys)
    values = {k: {row[k] for row in rows} - {None} for k in group_keys}
    numeric_keys = [k for k in group_keys if values[k] and all(map(_is_number, values[k]))]
    plots = write_plots(sweep_dir, jobs, groups, numeric_keys)

    columns = list(rows[0])
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    grouped = grouped_table(groups, group_keys)
    counts = sorted(Counter(row["status"] for row in rows).items())
    status_line = f"{len(rows)} jobs: " + ", ".join(f"{n} {status}" for status, n in counts)
    sections = [
        f"# Sweep {sweep_dir}",
        f"Overrides: `{' '.join(task)}`" if task else "Overrides: unknown (no multirun.yaml)",
        status_line,
        "## Mean ± sample std over seeds (completed jobs)",
        grouped,
        "## Jobs",
        md_table(columns, ([fmt(row[c], c) for c in columns] for row in rows)),
        "## Plots",
        *(f"![{p.stem}]({p.name})" for p in plots),
    ]
    (sweep_dir / "summary.md").write_text("\n\n".join(sections) + "\n")
    print(f"{sweep_dir}: {status_line}\n{grouped}\n(summary.md, summary.csv and plots written there)")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitlab.summarize", description="Write a multirun's summary tables and plots into its folder."
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. outputs/multirun/2026-01-31/12-00-00")
    args = parser.parse_args(argv)
    try:
        summarize(args.sweep_dir)
    except SweepNotFound as error:
        parser.exit(1, f"{error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
