"""PNG plots of runs and sweeps; learning curves come from the ``history`` of each run's metrics.json.

Figures are ``matplotlib.figure.Figure`` objects saved through the Agg canvas, never pyplot,
so nothing global is left behind (safe inside a Hydra callback or a notebook).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vitlab.rundir import read_metrics

if TYPE_CHECKING:
    import pandas as pd

Points = list[tuple[int, float]]


def curves(history: list[dict] | None) -> tuple[dict[str, Points], str]:
    """The learning curves of a run's history (a dict per finished epoch): ``({"train/loss",
    "val/loss", "train/acc", "val/acc"} present in the run, x label)``.

    x is the epoch (counted from 1), or the step if an entry has no epoch; an epoch recorded
    twice (a resumed run) keeps its last values.
    """
    history = history if isinstance(history, list) else []
    xlabel = "epoch" if all("epoch" in entry for entry in history) else "step"
    out = {}
    for name in ("train/loss", "val/loss", "train/acc", "val/acc"):
        points = {entry[xlabel]: entry[name] for entry in history if entry.get(name) is not None and xlabel in entry}
        if points:
            out[name] = sorted(points.items())
    return out, xlabel


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def _style(ax, xlabel: str, name: str) -> None:
    ax.set(xlabel=xlabel, ylabel=name, title=name)
    ax.grid(alpha=0.3)
    if xlabel in ("epoch", "step"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _panels(title: str) -> tuple[Figure, list]:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    fig.suptitle(title, fontsize="medium")
    return fig, list(fig.subplots(1, 2))


def plot_run_curves(run_dir: str | Path) -> Path | None:
    """``curves.png`` in the run folder: loss and accuracy, train against val, per epoch.

    Draws whatever curves the run has (a failed run may have few); None when it has none.
    """
    run_dir = Path(run_dir)
    data, xlabel = curves(read_metrics(run_dir).get("history"))
    if not data:
        return None
    fig, axes = _panels(run_dir.name)
    for ax, kind in zip(axes, ("loss", "acc")):
        for split in ("train", "val"):
            if f"{split}/{kind}" in data:
                ax.plot(*zip(*data[f"{split}/{kind}"]), marker="o", markersize=3, label=split)
        _style(ax, xlabel, kind)
        if ax.has_data():
            ax.legend()
    return _save(fig, run_dir / "curves.png")


def plot_sweep_curves(runs: pd.DataFrame, out_dir: str | Path) -> Path | None:
    """``curves_all.png``: val accuracy and training loss of every job of ``runs`` (a
    ``vitlab.results.load_runs`` table) overlaid, labelled by job folder; None when no job has
    recorded either yet."""
    fig, (acc_ax, loss_ax) = _panels("all jobs")
    xlabels = set()
    for job, history in zip(runs["job"], runs.get("history", [None] * len(runs))):
        data, xlabel = curves(history)
        for ax, name in ((acc_ax, "val/acc"), (loss_ax, "train/loss")):
            if name in data:
                ax.plot(*zip(*data[name]), marker="o", markersize=3, label=job)
                xlabels.add(xlabel)
    if not (acc_ax.has_data() or loss_ax.has_data()):
        return None
    for ax, name in ((acc_ax, "val/acc"), (loss_ax, "train/loss")):
        _style(ax, " / ".join(sorted(xlabels)), name)
    loss_ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return _save(fig, Path(out_dir) / "curves_all.png")


def plot_metric_vs_params(stats: pd.DataFrame, swept_numeric_keys: Iterable[str], out_dir: str | Path) -> list[Path]:
    """``metric_vs_<key>.png`` per swept numeric key: test and best val accuracy against the
    key's value, mean ± std over seeds, one line per setting of the other swept keys.

    ``stats`` is a ``vitlab.results.group_stats`` table: a row per setting of the swept keys
    other than the seed (its first columns, up to ``jobs``).
    """
    keys = list(stats.columns[: stats.columns.get_loc("jobs")])
    paths = []
    for key in swept_numeric_keys:
        others = [k for k in keys if k != key]
        settings = stats[others].itertuples(index=False) if others else [()] * len(stats)
        labels = [", ".join(f"{k}={v}" for k, v in zip(others, values)) for values in settings]
        fig, axes = _panels(f"accuracy against {key} (mean ± std over seeds)")
        for ax, metric in zip(axes, ("test_acc", "best_val_acc")):
            points = stats.assign(label=labels).dropna(subset=[key, f"{metric}_mean"]).sort_values(key)
            for label, line in points.groupby("label", sort=False):
                ax.errorbar(line[key].astype(float), line[f"{metric}_mean"], yerr=line[f"{metric}_std"].fillna(0.0),
                            marker="o", capsize=3, label=label or None)
            values = stats[key].dropna().astype(float)
            if len(values) and values.min() > 0 and values.max() >= 10 * values.min():  # e.g. learning rates
                ax.set_xscale("log")
            _style(ax, key, metric)
            if any(labels) and ax.has_data():
                ax.legend(fontsize="small")
        paths.append(_save(fig, Path(out_dir) / f"metric_vs_{key.replace('/', '-')}.png"))
    return paths
