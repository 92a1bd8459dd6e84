"""PNG plots of runs and sweeps, read back from the TensorBoard event files.

Figures are ``matplotlib.figure.Figure`` objects saved through the Agg canvas, never pyplot,
so nothing global is left behind (safe inside a Hydra callback or a notebook).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

Points = list[tuple[int, float]]


def read_scalars(run_dir: str | Path) -> dict[str, Points]:
    """``{tag: [(global step, value), ...]}`` of every scalar in the run folder's event files."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def curves(scalars: dict[str, Points]) -> tuple[dict[str, Points], str]:
    """The learning curves against epochs: ``({"train/loss", "val/loss", "train/acc", "val/acc"}
    present in the run, x label)``.

    Lightning logs an ``epoch`` scalar with every metric, which maps a step to its epoch; an
    epoch-end metric is drawn at the number of epochs done, the per-step training loss as its
    mean over each epoch. Without that scalar the x axis stays in steps.
    """
    epoch_at = dict(scalars.get("epoch", ()))
    x_of = (lambda step: int(epoch_at[step]) + 1 if step in epoch_at else None) if epoch_at else (lambda step: step)
    out = {}
    for name in ("train/loss", "val/loss", "train/acc", "val/acc"):
        by_x = defaultdict(list)
        for step, value in scalars.get(name, ()):
            if (x := x_of(step)) is not None:
                by_x[x].append(value)
        if by_x:
            out[name] = [(x, sum(v) / len(v)) for x, v in sorted(by_x.items())]
    return out, "epoch" if epoch_at else "step"


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
    data, xlabel = curves(read_scalars(run_dir))
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


def plot_sweep_curves(job_dirs: Iterable[str | Path], out_dir: str | Path) -> Path | None:
    """``curves_all.png``: val accuracy and training loss of every job overlaid, labelled by
    job folder; None when no job has logged either yet."""
    fig, (acc_ax, loss_ax) = _panels("all jobs")
    xlabels = set()
    for job in map(Path, job_dirs):
        data, xlabel = curves(read_scalars(job))
        for ax, name in ((acc_ax, "val/acc"), (loss_ax, "train/loss")):
            if name in data:
                ax.plot(*zip(*data[name]), marker="o", markersize=3, label=job.name)
                xlabels.add(xlabel)
    if not (acc_ax.has_data() or loss_ax.has_data()):
        return None
    for ax, name in ((acc_ax, "val/acc"), (loss_ax, "train/loss")):
        _style(ax, " / ".join(sorted(xlabels)), name)
    loss_ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return _save(fig, Path(out_dir) / "curves_all.png")


def plot_pos_emb_similarity(embeddings: dict[str, "np.ndarray"], grid: tuple[int, int], path: str | Path) -> Path:
    """Cosine similarity of each patch's position embedding with every other patch's, one
    panel per embedding (as in the ViT paper's Figure 7): panel (i, j) of a grid shows the
    similarity of patch (i, j) with all patches, laid out as the image.

    ``embeddings`` maps a label to an array of shape (rows * cols, dim), patches in row-major order.
    """
    import numpy as np

    rows, cols = grid
    fig = Figure(figsize=(5.2 * len(embeddings), 5.6), layout="constrained")
    fig.suptitle("position-embedding similarity: each tile is one patch's cosine similarity with all patches",
                 fontsize="medium")
    for subfig, (label, emb) in zip(np.atleast_1d(fig.subfigures(1, len(embeddings))), embeddings.items()):
        emb = np.asarray(emb, dtype=np.float64)
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        similarity = unit @ unit.T
        # One colour scale per embedding, from its lowest similarity to 1: the fixed sincos
        # embedding of a small grid varies over a narrow range that a -1..1 scale would hide.
        low = float(similarity.min())
        subfig.suptitle(f"{label} (colour scale {low:.2f} to 1)")
        axes = subfig.subplots(rows, cols, gridspec_kw={"wspace": 0.05, "hspace": 0.05})
        for index, ax in enumerate(np.asarray(axes).flat):
            image = ax.imshow(similarity[index].reshape(rows, cols), vmin=low, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
        subfig.colorbar(image, ax=subfig.axes, shrink=0.6, label="cosine similarity")
    return _save(fig, Path(path))


def plot_metric_vs_params(groups: list[dict], swept_numeric_keys: Iterable[str], out_dir: str | Path) -> list[Path]:
    """``metric_vs_<key>.png`` per swept numeric key: test and best val accuracy against the
    key's value, mean ± std over seeds, one line per setting of the other swept keys.

    ``groups`` are ``vitlab.summarize.group_stats`` results: one per setting of the swept keys
    other than the seed, ``{"setting": {key: value}, "stats": {metric: (mean, std, n)}, ...}``.
    """
    paths = []
    for key in swept_numeric_keys:
        lines = defaultdict(list)
        for group in groups:
            others = ", ".join(f"{k}={v}" for k, v in group["setting"].items() if k != key)
            lines[others].append(group)
        fig, axes = _panels(f"accuracy against {key} (mean ± std over seeds)")
        for ax, metric in zip(axes, ("test_acc", "best_val_acc")):
            for label, members in lines.items():
                points = sorted(
                    (g["setting"][key], *g["stats"][metric][:2])
                    for g in members
                    if g["setting"][key] is not None and g["stats"][metric][0] is not None
                )
                if points:
                    xs, means, stds = zip(*points)
                    ax.errorbar(xs, means, yerr=[s or 0.0 for s in stds], marker="o", capsize=3, label=label or None)
            values = [g["setting"][key] for g in groups if g["setting"][key] is not None]
            if values and min(values) > 0 and max(values) >= 10 * min(values):  # e.g. learning rates
                ax.set_xscale("log")
            _style(ax, key, metric)
            if any(lines) and ax.has_data():
                ax.legend(fontsize="small")
        paths.append(_save(fig, Path(out_dir) / f"metric_vs_{key.replace('/', '-')}.png"))
    return paths

