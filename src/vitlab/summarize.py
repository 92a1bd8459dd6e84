"""Summarise a multirun: ``python -m vitlab.summarize outputs/multirun/<date>/<time>``.

Writes into the sweep folder ``summary.csv`` and ``summary.md`` (a row per job, and mean ± std
over seeds per setting of the other swept keys), ``metric_vs_<key>.png`` per swept numeric key,
``curves_all.png``, and each job's ``curves.png``; prints the grouped table. It reports what is
there, so it works on a sweep that is still running or partly failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from vitlab.plots import plot_metric_vs_params, plot_run_curves, plot_sweep_curves
from vitlab.results import FIELDS, STATS, analyses, group_stats, job_dirs, key_columns, load_runs, sweep_overrides
from vitlab.rundir import METRICS_FILE

#: Number formats of the Markdown tables (the CSV keeps full precision).
FORMATS = {"best_val_acc": ".4f", "test_acc": ".4f", "test_loss": ".4f", "wall_time_s": ".1f", "train_images_per_s": ".1f"}


class SweepNotFound(Exception):
    """The path is not a sweep folder with jobs; the message says why, in one sentence."""


def fmt(value: Any, column: str = "") -> str:
    if pd.isna(value):
        return "–"
    if isinstance(value, float):
        return format(value, FORMATS.get(column, ".4g"))
    return str(value)


def fmt_stat(stats: pd.Series, metric: str) -> str:
    """A metric of a ``group_stats`` row as ``0.9123 ± 0.0041 (n=3)``; a single value has no
    spread, none at all is ``–``."""
    mean, std, n = stats[f"{metric}_mean"], stats[f"{metric}_std"], int(stats[f"{metric}_n"])
    if not n:
        return "–"
    return f"{fmt(mean, metric)} ± {fmt(std, metric)} (n={n})" if n > 1 else f"{fmt(mean, metric)} (n=1)"


def markdown(table: pd.DataFrame) -> str:
    """The table's cells as they are (already formatted), pipes escaped."""
    return table.map(lambda cell: str(cell).replace("|", "\\|")).to_markdown(index=False, disable_numparse=True)


def grouped_table(stats: pd.DataFrame, keys: list[str], metrics: list[str] = STATS) -> str:
    table = stats[keys].apply(lambda column: column.map(fmt))
    table["completed"] = stats["completed"].astype(str) + "/" + stats["jobs"].astype(str)
    for m in metrics:
        table[m] = [fmt_stat(row, m) for _, row in stats.iterrows()]
    return markdown(table)


def write_plots(sweep_dir: Path, runs: pd.DataFrame, stats: pd.DataFrame, numeric_keys: list[str]) -> list[Path]:
    """Each job's ``curves.png`` (again when its metrics.json is newer), then the sweep's plots."""
    for job in runs["dir"]:
        metrics, curves = job / METRICS_FILE, job / "curves.png"
        if metrics.is_file() and (not curves.exists() or curves.stat().st_mtime < metrics.stat().st_mtime):
            plot_run_curves(job)
    plots = [*plot_metric_vs_params(stats, numeric_keys, sweep_dir), plot_sweep_curves(runs, sweep_dir)]
    return [p for p in plots if p is not None]


def summarize(sweep_dir: str | Path, analysis: str | Path | None = None) -> pd.DataFrame:
    """Write the sweep's tables and plots, print the grouped table; returns the jobs
    (``vitlab.results.load_runs``). ``analysis``: a folder of ``python -m vitlab.analyze``
    results, whose scalar numbers for the jobs (``mean_attention_distance``, ...) become columns of
    both tables."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepNotFound(f"{sweep_dir} is not a folder.")
    if not job_dirs(sweep_dir):
        raise SweepNotFound(f"{sweep_dir} has no job folders (subfolders with {METRICS_FILE} or .hydra/).")

    runs = load_runs(sweep_dir, analysis=analysis)
    keys = key_columns(runs)
    group_keys = [k for k in keys if k != "seed"]
    found = {k for summary in analyses(analysis).values() for k in summary} if analysis is not None else set()
    extra = [k for k in runs.columns if k in found and is_numeric_dtype(runs[k]) and runs[k].notna().any()]
    stats = group_stats(runs, group_keys, [*STATS, *extra])
    numeric = [k for k in group_keys if is_numeric_dtype(runs[k]) and not is_bool_dtype(runs[k]) and runs[k].notna().any()]
    plots = write_plots(sweep_dir, runs, stats, numeric)

    jobs = runs[["job", *keys, *FIELDS.values(), *extra]]
    jobs.to_csv(sweep_dir / "summary.csv", index=False)
    grouped = grouped_table(stats, group_keys, [*STATS, *extra])
    counts = runs["status"].value_counts().sort_index()
    status_line = f"{len(runs)} jobs: " + ", ".join(f"{n} {status}" for status, n in counts.items())
    task = sweep_overrides(sweep_dir)
    sections = [
        f"# Sweep {sweep_dir}",
        f"Overrides: `{' '.join(task)}`" if task else "Overrides: unknown (no multirun.yaml)",
        status_line,
        "## Mean ± sample std over seeds (completed jobs)",
        grouped,
        "## Jobs",
        markdown(jobs.apply(lambda column: column.map(lambda value: fmt(value, column.name)))),
        "## Plots",
        *(f"![{p.stem}]({p.name})" for p in plots),
    ]
    (sweep_dir / "summary.md").write_text("\n\n".join(sections) + "\n")
    print(f"{sweep_dir}: {status_line}\n{grouped}\n(summary.md, summary.csv and plots written there)")
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitlab.summarize", description="Write a multirun's summary tables and plots into its folder."
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. outputs/multirun/2026-01-31/12-00-00")
    parser.add_argument("--analysis", type=Path, default=None,
                        help="a folder of python -m vitlab.analyze results (e.g. outputs/analyze): their numbers "
                             "for the sweep's jobs become columns")
    args = parser.parse_args(argv)
    try:
        summarize(args.sweep_dir, args.analysis)
    except (SweepNotFound, FileNotFoundError) as error:
        parser.exit(1, f"{error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
