"""Write ``docs/ablations.md`` and its figures from the ablation sweeps' results.

    python scripts/ablation_report.py [--multirun outputs/multirun] [--docs docs]

Reads ``<multirun>/ablation_<name>[_10ep]/`` (the folders ``scripts/ablate.sh <name>
[trainer.max_epochs=10]`` fills: one job folder per setting and seed, each with
``metrics.json``), and writes per ablation and length a table of mean ± sample std over seeds,
a figure, and a sentence on whether the paper's direction was reproduced, judged from the
numbers: a difference counts only when Welch's t-test over the seeds gives p < 0.05.

The small records of every completed job (metrics.json, config.yaml, .hydra/overrides.yaml)
are first copied into ``<docs>/ablations/runs/<sweep>/``, which is committed, and the tables
are computed from there: results outlive the git-ignored outputs folder, and
``scripts/ablate.sh`` copies them back so that a sweep restarted in a new checkout skips the
jobs already done. A section whose sweep has no records here keeps its text from the page's
previous generation; one never run is listed with its command. Nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import yaml
from matplotlib.figure import Figure
from scipy.stats import ttest_ind_from_stats

from vitlab.analysis import plot_pos_emb_similarity
from vitlab.budget import cpu_name
from vitlab.models.position import posemb_sincos_2d
from vitlab.results import group_stats, job_dirs, load_runs
from vitlab.rundir import read_metrics
from vitlab.summarize import markdown

ROOT = Path(__file__).resolve().parents[1]
#: What the tables and verdicts use: mean ± std over the completed jobs of each setting.
METRICS = ("test_acc", "best_val_acc", "flops_per_image", "params")


# --------------------------------------------------------------------------- statistics
class Stat(NamedTuple):
    """Mean, sample std and n over the completed jobs of a setting (vitlab.results.group_stats)."""

    mean: float
    std: float
    n: int

    def pct(self) -> str:
        """``91.23 ± 0.41`` in percent (n is given by the table's column)."""
        if not self.n:
            return "–"
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}" if self.n > 1 else f"{100 * self.mean:.2f}"


def difference(a: Stat, b: Stat) -> tuple[float, float]:
    """(mean of a − mean of b, its standard error), both in points (percent)."""
    se = math.sqrt((a.std**2 / a.n if a.n > 1 else 0) + (b.std**2 / b.n if b.n > 1 else 0))
    return 100 * (a.mean - b.mean), 100 * se


#: A difference is real when Welch's two-sided t-test over the seeds gives p below this.
ALPHA = 0.05


def welch(a: Stat, b: Stat) -> tuple[float, float, float]:
    """(mean of a − mean of b in points, its standard error, Welch's two-sided t-test p)."""
    diff, se = difference(a, b)
    if se > 0:
        return diff, se, float(ttest_ind_from_stats(a.mean, a.std, a.n, b.mean, b.std, b.n, equal_var=False).pvalue)
    return diff, se, 0.0 if diff else 1.0  # no spread at all: any difference is real


def p_value(p: float) -> str:
    """p to two significant digits, three where two would round onto ALPHA and hide its side."""
    return f"{p:.3g}" if f"{p:.2g}" == f"{ALPHA:.2g}" else f"{p:.2g}"


def verdict(a: Stat, b: Stat, a_name: str, b_name: str) -> tuple[int, str]:
    """(+1 if a is better beyond noise, -1 if worse, 0 within noise; a phrase saying so). Noise is
    judged by Welch's t-test over the seeds (unequal spreads, few seeds: with 3 against 3 a
    difference must reach about 2.8 standard errors, with 2 against 2 about 4.3, not 2)."""
    diff, se, p = welch(a, b)
    text = f"{a_name} − {b_name} = {diff:+.2f} ± {se:.2f} points, Welch's t-test p = {p_value(p)}"
    if p < ALPHA:
        return (1 if diff > 0 else -1), text
    return 0, text + f" (p ≥ {ALPHA:g}: no clear difference)"


#: Seeds a setting needs before it takes part in a verdict: with one, its spread is unknown.
MIN_SEEDS = 2


def judged(group: "Group") -> bool:
    return group.stat("test_acc").n >= MIN_SEEDS


# --------------------------------------------------------------------------- reading
@dataclass
class Group:
    """One setting of the ablation's keys: its row of group statistics and its jobs."""

    setting: dict
    stats: pd.Series
    jobs: pd.DataFrame

    def stat(self, metric: str) -> Stat:
        return Stat(*(self.stats[f"{metric}_{s}"] for s in ("mean", "std")), int(self.stats[f"{metric}_n"]))

    def value(self, field: str) -> float | None:
        """A field that every job of the setting shares (parameters, FLOPs), None before one completed."""
        return self.stat(field).mean if self.stat(field).n else None

    @property
    def completed(self) -> int:
        return int(self.stats["completed"])


def read_sweep(runs: pd.DataFrame, keys: list[str], metrics: tuple[str, ...] = METRICS) -> list[Group]:
    """The settings of ``keys`` (all swept keys but the seed) among a sweep's jobs, sorted by value."""
    jobs, stats = dict(list(runs.groupby(keys, sort=False, dropna=False))), group_stats(runs, keys, metrics)
    return [Group(dict(zip(keys, setting)), row, jobs[setting])
            for setting, (_, row) in zip(stats[keys].itertuples(index=False, name=None), stats.iterrows())]


def job_config(job_dir: Path) -> dict:
    return yaml.safe_load((job_dir / "config.yaml").read_text())


# --------------------------------------------------------------------------- figures
def errorbar_figure(path: Path, title: str, series: dict[str, list[tuple[float, Stat, str]]], xlabel: str,
                    log_x: bool = False, categorical: bool = False) -> Path:
    """Test accuracy (mean ± std over seeds) against x, one line per series."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    for label, points in series.items():
        xs = list(range(len(points))) if categorical else [p[0] for p in points]
        ax.errorbar(xs, [100 * p[1].mean for p in points], yerr=[100 * (p[1].std if p[1].n > 1 else 0) for p in points],
                    marker="o", capsize=4, label=label or None)
        for x, (_, _, note) in zip(xs, points):
            if note:
                ax.annotate(note, (x, 100 * points[xs.index(x)][1].mean), textcoords="offset points", xytext=(6, 6),
                            fontsize="small")
        if categorical:
            ax.set_xticks(xs, [str(p[0]) for p in points])
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    if any(series):
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------- ablations
@dataclass
class Ablation:
    name: str
    title: str
    keys: list[str]
    paper: str
    # (groups, figure path of a base name) -> (markdown paragraphs, figure file names)
    render: Callable[[list[Group], Callable[[str], Path]], tuple[list[str], list[str]]]
    #: What ``scripts/ablate.sh <name>`` is given for the 10-epoch sweep.
    #: Every 10-epoch table runs in fp32 (32-true), as its first jobs did on a CPU without bf16 units:
    #: on a CPU with them the default would be bf16-mixed, and a table must not mix precisions.
    long_args: str = "trainer.max_epochs=10 trainer.precision=32-true"
    #: What ``scripts/ablate.sh <name>`` is given for the 1-epoch sweep (and before ``long_args``).
    args: str = ""
    #: What only the 1-epoch sweep is given besides ``args``.
    short_args: str = ""
    #: Columns of metrics.json (or added by ``prepare``) averaged per setting besides ``METRICS``.
    metrics: tuple[str, ...] = ()
    #: Adds measured columns to a sweep's jobs (e.g. from their checkpoints) before grouping.
    prepare: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    #: (key, base value): the page's summary compares every other value of this key with the base,
    #: the ablation's other keys (a learning rate) held equal. None: the ablation is not summed up.
    glance: tuple[str, object] | None = None


#: The lengths every ablation is reported at: (sweep-folder suffix, heading, training length).
LENGTHS = (("_10ep", "10 epochs", "10 epochs"), ("", "1 epoch (early training)", "1 epoch"))
#: The job records kept under docs/ablations/runs/ (no checkpoints).
RECORDS = ("metrics.json", "config.yaml", ".hydra/overrides.yaml")


#: Marks the speed and job time of a setting whose jobs all took another sweep's results (reuse).
REUSED_MARK = "‡"


def reused(runs: pd.DataFrame) -> pd.Series:
    """Which jobs took the results of the same run in another sweep (``reused_from`` in metrics.json)."""
    return runs["reused_from"].notna() if "reused_from" in runs else pd.Series(False, index=runs.index)


def timing(g: Group) -> tuple[str, str, bool]:
    """(images/s, job time, borrowed) of a setting: means over its completed jobs trained in this
    sweep. A setting whose jobs all took the results of another sweep's run shows that run's
    figures, borrowed and marked with ``REUSED_MARK``: they were measured at another time, beside
    other work."""
    jobs = g.jobs[g.jobs["status"].eq("completed")]
    own = jobs[~reused(jobs)]
    borrowed = not len(own) and bool(len(jobs))
    source, mark = (jobs, f" {REUSED_MARK}") if borrowed else (own, "")
    means = (pd.to_numeric(source.get(k, pd.Series(dtype=float)), errors="coerce").mean()
             for k in ("train_images_per_s", "wall_time_s"))
    speed, wall = (f"{mean:.0f}{mark}" if pd.notna(mean) else "–" for mean in means)
    return speed, wall, borrowed


def table(groups: list[Group], label: Callable[[Group], list[str]], header: list[str]) -> str:
    rows, any_borrowed = [], False
    for g in groups:
        flops = g.value("flops_per_image")
        speed, wall, borrowed = timing(g)
        any_borrowed |= borrowed
        rows.append(label(g) + [
            f"{g.completed}/{len(g.jobs)}", g.stat("test_acc").pct(), g.stat("best_val_acc").pct(),
            f"{flops / 1e6:.1f}" if flops else "–", speed, wall,
        ])
    columns = header + ["seeds", "test acc (%)", "best val acc (%)", "MFLOPs/img", "images/s", "job time (s)"]
    text = markdown(pd.DataFrame(rows, columns=columns))
    if any_borrowed:
        text += (f"\n\n{REUSED_MARK} Speed and time of the other sweep's run whose results these jobs took "
                 "(reuse): measured at another time, beside other work, so not comparable with the rest of the "
                 "column.")
    return text


def images_seen(g: Group) -> str:
    """Training images of a compute-matched job (``budget.images``), in thousands."""
    plans = [b for b in g.jobs.get("budget", []) if isinstance(b, dict)]
    return f"{plans[0]['images'] / 1000:.1f}k" if plans else "–"


def render_patch_size(groups: list[Group], figure: Callable[[str], Path], compute: bool = False):
    image = 28
    label = (lambda g: [str(g.setting["model.patch_size"]), str((image // g.setting["model.patch_size"]) ** 2)]
             + ([images_seen(g)] if compute else []))
    md = [table(groups, label, ["patch", "tokens"] + (["images seen"] if compute else []))]
    points = [(g.value("flops_per_image") / 1e6, g.stat("test_acc"), f"p{g.setting['model.patch_size']}")
              for g in groups if g.stat("test_acc").n and g.value("flops_per_image")]
    name, title = ("patch_size_compute", "patch size at equal training FLOPs") if compute else (
        "patch_size", "patch size: accuracy against compute")
    figs = [errorbar_figure(figure(name), title, {"": points},
                            "forward MFLOPs per image (log)", log_x=True).name] if points else []
    done = [g for g in groups if judged(g)]
    if len(done) >= 2:
        pairs = [verdict(a.stat("test_acc"), b.stat("test_acc"), f"patch {a.setting['model.patch_size']}",
                         f"patch {b.setting['model.patch_size']}") for a, b in zip(done, done[1:])]
        better = [s for s, _ in pairs]
        if all(s == 1 for s in better):
            outcome = "**Reproduced**: each smaller patch is better than the next larger one, beyond noise"
        elif all(s == -1 for s in better):
            outcome = ("**Opposite of the paper**: each larger patch is better than the next smaller one, beyond noise. "
                       + ("At equal training FLOPs a larger patch sees more images for the same compute, and at this "
                          "small budget that wins" if compute else
                          "A likely reason: the paper compares models trained to convergence, and at a short budget "
                          "fewer, larger tokens learn faster while the extra compute of small patches has not paid "
                          "yet; training longer tests it"))
        elif all(s >= 0 for s in better) and any(s == 1 for s in better):
            outcome = "**Reproduced in direction**: accuracy never drops with a smaller patch, though not every step is beyond noise"
        else:
            best = max(done, key=lambda g: g.stat("test_acc").mean)
            outcome = (f"**Not reproduced across the whole range**: the best is patch {best.setting['model.patch_size']}; "
                       "smaller is not better at every step")
        md.append(f"{outcome} ({'; '.join(t for _, t in pairs)}).")
    return md, figs


def render_pos_emb(groups: list[Group], figure: Callable[[str], Path]):
    order = {"sincos2d": 0, "learned": 1, "none": 2}
    groups.sort(key=lambda g: order.get(g.setting["model.pos_emb"], 9))
    md = [table(groups, lambda g: [str(g.setting["model.pos_emb"])], ["position embedding"])]
    points = [(g.setting["model.pos_emb"], g.stat("test_acc"), "") for g in groups if g.stat("test_acc").n]
    by = {g.setting["model.pos_emb"]: g.stat("test_acc") for g in groups if judged(g)}
    figs = [errorbar_figure(figure("pos_emb"), "position embedding", {"": points}, "position embedding",
                            categorical=True).name] if points else []
    sentences = []
    if "none" in by and "sincos2d" in by:
        s, text = verdict(by["sincos2d"], by["none"], "sincos2d", "none")
        sentences.append(("**Reproduced**: position information helps" if s == 1 else
                          "**Not reproduced**: without a position embedding the model is not worse here" if s == 0 else
                          "**Opposite**: the model without position embedding is better") + f" ({text}).")
    if "learned" in by and "sincos2d" in by:
        s, text = verdict(by["sincos2d"], by["learned"], "sincos2d", "learned")
        sentences.append(("**Beyer et al.'s direction reproduced**: the fixed sincos embedding beats a learned one" if s == 1 else
                          "**Learned and fixed embeddings tie** (the ViT paper's 1-D vs 2-D finding; Beyer et al.'s "
                          "1.5-point gap, measured at 90 ImageNet epochs, does not show here)" if s == 0 else
                          "**Opposite of Beyer et al.**: the learned embedding is better here") + f" ({text}).")
    md += sentences
    sim, notes = pos_emb_similarity(groups, figure)
    if sim:
        figs.append(sim)
        md.append("Structure of the embeddings in the figure below (the ViT paper's Fig. 7 shows learned embeddings "
                  "that end up encoding rows and columns): " + "; ".join(notes) + ".")
    return md, figs


def pos_emb_similarity(groups: list[Group], figure: Callable[[str], Path]) -> tuple[str | None, list[str]]:
    """The similarity figure of the fixed embedding and of the learned one of the first seed,
    and a sentence per embedding on its 2-D structure."""
    embeddings, grid = {}, None
    for g in groups:
        kind = g.setting["model.pos_emb"]
        done = g.jobs[g.jobs["status"] == "completed"].sort_values("seed")
        if kind == "none" or done.empty:
            continue
        job = done.iloc[0]
        cfg = job_config(job["dir"])
        side = cfg["model"]["image_size"] // cfg["model"]["patch_size"]
        grid = (side, side)
        if kind == "sincos2d":
            embeddings["sincos2d (fixed)"] = posemb_sincos_2d(side, side, cfg["model"]["dim"]).numpy()
        else:
            # Kept beside the job's records (19 KB), since its checkpoint stays in outputs/.
            kept = job["kept"] / "pos_embedding.npy"
            ckpt = sorted((job["dir"] / "checkpoints").glob("best*.ckpt"))
            if ckpt:
                state = torch.load(ckpt[-1], map_location="cpu", weights_only=True)["state_dict"]
                np.save(kept, state["net.pos_embedding"].float().numpy())
            if kept.is_file():
                embeddings[f"learned (seed {job['seed']}, best checkpoint)"] = np.load(kept)
    if not embeddings:
        return None, []
    notes = [f"{label}: {neighbour_contrast(emb, grid)}" for label, emb in embeddings.items()]
    return plot_pos_emb_similarity(embeddings, grid, figure("pos_emb_similarity")).name, notes


def neighbour_contrast(emb: np.ndarray, grid: tuple[int, int]) -> str:
    """How much 2-D structure an embedding has: the mean cosine similarity of patches next to
    each other against that of patches three or more rows or columns apart."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    distance = np.maximum(abs(rows[:, None] - rows[None]), abs(cols[:, None] - cols[None]))
    near, far = similarity[distance == 1].mean(), similarity[distance >= 3].mean()
    return f"mean cosine similarity {near:.2f} between neighbouring patches, {far:.2f} between patches 3 or more apart"


def render_pool(groups: list[Group], figure: Callable[[str], Path]):
    md = [table(groups, lambda g: [str(g.setting["model.pool"]), f"{g.setting['optimizer.lr']:g}"], ["pool", "lr"])]
    series, best = {}, {}
    for g in groups:
        if g.stat("test_acc").n:
            series.setdefault(g.setting["model.pool"], []).append((g.setting["optimizer.lr"], g.stat("test_acc"), ""))
            pool = g.setting["model.pool"]
            # Each pooling at its own learning rate, chosen on validation accuracy (not test).
            if pool not in best or g.stat("best_val_acc").mean > best[pool].stat("best_val_acc").mean:
                best[pool] = g
    figs = [errorbar_figure(figure("pool"), "pooling against learning rate", series, "learning rate (log)",
                            log_x=True).name] if series else []
    if best and not all(judged(g) for g in best.values()):
        md.append("Learning rate with the best mean validation accuracy so far: " + ", ".join(
            f"{pool} {g.setting['optimizer.lr']:g} ({g.stat('best_val_acc').n} seed{'s' * (g.stat('best_val_acc').n > 1)})"
            for pool, g in sorted(best.items(), key=lambda item: item[0] != "mean")) + f"; the verdict waits for {MIN_SEEDS} seeds of each.")
    elif "mean" in best and "cls" in best:
        m, c = best["mean"], best["cls"]
        s, text = verdict(m.stat("test_acc"), c.stat("test_acc"),
                          f"mean (lr {m.setting['optimizer.lr']:g})", f"cls (lr {c.setting['optimizer.lr']:g})")
        md.append("Each pooling at the learning rate with its best mean validation accuracy: " + (
            "**Beyer et al.'s direction reproduced**: mean pooling beats the class token" if s == 1 else
            "**The ViT paper's finding reproduced**: tuned separately, the two poolings tie" if s == 0 else
            "**Opposite of Beyer et al.**: the class token is better here") + f" ({text}).")
    return md, figs


def render_depth_width(groups: list[Group], figure: Callable[[str], Path]):
    def depth(g):
        return int(str(g.setting["shape"]).split("_")[0][1:])

    groups.sort(key=depth)
    md = [table(groups, lambda g: [str(g.setting["shape"]), str(depth(g)), f"{g.value('params'):.0f}" if g.value("params") else "–"],
                ["shape", "depth", "params"])]
    points = [(depth(g), g.stat("test_acc"), str(g.setting["shape"])) for g in groups if g.stat("test_acc").n]
    figs = [errorbar_figure(figure("depth_width"), "depth x width at matched FLOPs", {"": points}, "depth (log)",
                            log_x=True).name] if points else []
    done = [g for g in groups if judged(g)]
    if len(done) >= 2:
        best = max(done, key=lambda g: g.stat("test_acc").mean)
        shallow = done[0]
        parts = [f"The best shape is {best.setting['shape']}"]
        if best is not shallow:
            s, text = verdict(best.stat("test_acc"), shallow.stat("test_acc"), str(best.setting["shape"]),
                              str(shallow.setting["shape"]))
            parts.append(("**depth pays at matched compute** (" if s == 1 else "no clear gain over the shallowest ("
                          ) + text + ")")
        if best is not done[-1]:
            s, text = verdict(best.stat("test_acc"), done[-1].stat("test_acc"), str(best.setting["shape"]),
                              str(done[-1].setting["shape"]))
            parts.append(("and **too deep and narrow loses again** (" if s == 1 else "and the deepest is about as good ("
                          ) + text + ")")
        md.append(", ".join(parts) + ".")
    return md, figs


def render_heads(groups: list[Group], figure: Callable[[str], Path]):
    md = [table(groups, lambda g: [str(g.setting["model.heads"]), str(96 // g.setting["model.heads"])],
                ["heads", "dim per head"])]
    points = [(g.setting["model.heads"], g.stat("test_acc"), "") for g in groups if g.stat("test_acc").n]
    figs = [errorbar_figure(figure("heads"), "heads at fixed inner width", {"": points}, "heads (log)",
                            log_x=True).name] if points else []
    done = [g for g in groups if judged(g)]
    one = next((g for g in done if g.setting["model.heads"] == 1), None)
    if one and len(done) >= 2:
        best = max(done, key=lambda g: g.stat("test_acc").mean)
        if best is one:
            md.append("**Not reproduced**: a single head is the best setting here.")
        else:
            s, text = verdict(best.stat("test_acc"), one.stat("test_acc"), f"{best.setting['model.heads']} heads", "1 head")
            most = done[-1]
            tail = (f" The most heads tried ({most.setting['model.heads']}) is the best, so the loss from too many "
                    "heads does not appear in this range." if best is most else
                    f" Beyond {best.setting['model.heads']} heads accuracy falls again, as in the paper.")
            md.append(("**Reproduced**: one head is worse than the best" if s == 1 else
                       "**Not clearly reproduced**: one head is within noise of the best") + f" ({text})." + tail)
    return md, figs


# --------------------------------------------------------------------------- the design space since 2022
def shown(value) -> str:
    """A setting as the tables print it: ``off`` for null, ``1e-05``, ``true``, ``[4, 7, 14]``."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "off"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def pct_of(g: Group, metric: str) -> str:
    return g.stat(metric).pct() if metric in {k.rsplit("_", 1)[0] for k in g.stats.index} else "–"


def against_base(groups: list[Group], key: str, base, metric: str = "test_acc",
                 name: Callable[[object], str] = shown) -> list[tuple[Group, int, str]]:
    """Each judged setting of ``key`` against the judged setting equal to ``base``: (setting, sign,
    phrase) from ``verdict``."""
    ref = next((g for g in groups if shown(g.setting[key]) == shown(base) and judged(g)), None)
    if ref is None:
        return []
    return [(g, *verdict(g.stat(metric), ref.stat(metric), name(g.setting[key]), name(base)))
            for g in groups if g is not ref and judged(g) and g.stat(metric).n >= MIN_SEEDS]


def switch_render(key: str, header: str, base, figure_name: str, title: str,
                  outcome: Callable[[list[tuple[Group, int, str]]], str],
                  extra: tuple[tuple[str, Callable[[Group], str]], ...] = ()):
    """A switch's section: the table (a column per ``extra``), a figure of test accuracy per
    setting, and ``outcome`` of the verdicts of every setting against ``base``."""
    def render(groups: list[Group], figure: Callable[[str], Path]):
        md = [table(groups, lambda g: [shown(g.setting[key])] + [cell(g) for _, cell in extra],
                    [header] + [h for h, _ in extra])]
        points = [(shown(g.setting[key]), g.stat("test_acc"), "") for g in groups if g.stat("test_acc").n]
        figs = [errorbar_figure(figure(figure_name), title, {"": points}, header, categorical=True).name] if points else []
        results = against_base(groups, key, base)
        if results:
            md.append(f"{outcome(results)} ({'; '.join(text for _, _, text in results)}).")
        return md, figs
    return render


def no_loss(results, gain: str, tie: str, loss: str) -> str:
    signs = [s for _, s, _ in results]
    return loss if -1 in signs else gain if 1 in signs else tie


def network_and_test_images(checkpoint: Path, images: int):
    """The network of a checkpoint (eval mode) and the first ``images`` test images of its run's
    dataset, normalised as the run fed them."""
    import hydra

    from vitlab.checkpoint import model_from_checkpoint
    from vitlab.eval import data_config

    module, info = model_from_checkpoint(checkpoint)
    data = data_config(yaml_config({"ckpt_path": str(checkpoint), "paths": {"data_dir": data_dir()}}), info)
    datamodule = hydra.utils.instantiate(data)
    datamodule.setup("test")
    return module.net.eval(), datamodule.normalize(datamodule.test_set.images[:images])


#: What the registers table measures on each job's best checkpoint (kept in its records folder).
REGISTER_MEASURES = ("max_over_median", "attention_to_registers", "attention_peak", "patches")


def measure_registers(checkpoint: Path, images: int = 256) -> dict:
    """What Darcet et al. 2024 look at, over the first ``images`` test images:

    - the norms of the output patch tokens (the residual stream entering the final LayerNorm;
      class token and registers left out): median, largest and their ratio (Fig. 3: without
      registers a few tokens reach about 10x);
    - the last block's attention, heads averaged, from the patch queries: the share that goes to
      the registers (``attention_to_registers``), and its largest share on one patch times the
      number of patches (``attention_peak``: 1 is uniform; Fig. 2's artifacts are a few patches
      that draw much of the attention).
    """
    from vitlab.analysis import attention_distance, patch_distances, query_view, recording_tokens
    from vitlab.models.attention import recording_attention
    from vitlab.models.parts import patch_tokens

    net, batch = network_and_test_images(checkpoint, images)
    with torch.no_grad(), recording_attention(net) as maps, recording_tokens(net) as seen:
        _, prefix, suffix = net.encode(batch)
    norms = patch_tokens(seen[0], prefix, suffix).float().norm(dim=-1).flatten()
    weights = maps[-1]
    patches = weights.shape[-1] - prefix - suffix
    grid = int(round(patches**0.5))
    _, to_others = attention_distance(weights, patch_distances((grid, grid), 1), prefix, suffix)
    view = query_view(weights.double().mean(dim=1), prefix, suffix, use_cls=False)  # (images, patches)
    median, largest = float(norms.median()), float(norms.max())
    return {"images": images, "median": median, "max": largest, "max_over_median": largest / median,
            "attention_to_registers": float(to_others.mean()),
            "attention_peak": float((view.max(dim=-1).values * patches).mean()), "patches": patches}


def last_block_attention(checkpoint: Path, images: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, grid, grid) of the last block's attention over the patches (heads averaged, mean
    of the patch queries' rows, renormalised over the patches), and the images themselves."""
    from vitlab.analysis import query_view
    from vitlab.models.attention import recording_attention

    net, batch = network_and_test_images(checkpoint, images)
    with torch.no_grad(), recording_attention(net) as maps:
        _, prefix, suffix = net.encode(batch)
    view = query_view(maps[-1].double().mean(dim=1), prefix, suffix, use_cls=False)
    grid = int(round(view.shape[-1] ** 0.5))
    return view.reshape(len(view), grid, grid).numpy(), batch[:, 0].numpy()


def register_attention_figure(path: Path, checkpoints: dict[str, Path], images: int = 8) -> Path:
    """A row per register count (its seed-0 model): the last block's attention over the patches of
    the same test images, overlaid on them (Darcet et al. 2024, Fig. 1 and 7)."""
    rows = {label: last_block_attention(ckpt, images) for label, ckpt in checkpoints.items()}
    fig = Figure(figsize=(1.3 * images + 1.2, 1.45 * len(rows) + 0.5), layout="constrained")
    fig.suptitle("last block's attention over the patches (heads averaged, from the patch queries), seed 0",
                 fontsize="small")
    axes = np.asarray(fig.subplots(len(rows), images, squeeze=False))
    for r, (label, (maps, pictures)) in enumerate(rows.items()):
        for c in range(images):
            ax = axes[r, c]
            size = pictures[c].shape[-1]
            ax.imshow(pictures[c], cmap="gray")
            ax.imshow(maps[c], cmap="inferno", alpha=0.6, interpolation="nearest",
                      extent=(-0.5, size - 0.5, size - 0.5, -0.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize="small")
    fig.savefig(path, dpi=90)
    return path


def yaml_config(values: dict):
    from omegaconf import OmegaConf

    return OmegaConf.create(values)


def data_dir() -> str:
    import os

    return os.environ.get("VITLAB_DATA_DIR", "data")


def checkpoint_measures(runs: pd.DataFrame, cache_name: str, fields: tuple[str, ...],
                        measure: Callable[[Path, Path], dict]) -> dict[str, list]:
    """``fields`` of each job: measured by ``measure(best checkpoint, records folder)`` where the job
    completed and its sweep folder still has the checkpoint and the kept file lacks one of them,
    and kept beside its records (``cache_name``) for later generations; a field the kept file
    lacks is None."""
    import json

    measured = {field: [] for field in fields}
    for job_dir, kept, status in zip(runs["dir"], runs["kept"], runs["status"]):
        cache = Path(kept) / cache_name
        best = sorted((Path(job_dir) / "checkpoints").glob("best*.ckpt"))
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        if status == "completed" and best and any(field not in cached for field in fields):
            cached = measure(best[-1], Path(kept))
            cache.write_text(json.dumps(cached, indent=1))
        for field in fields:
            measured[field].append(cached.get(field))
    return measured


def add_register_measures(runs: pd.DataFrame) -> pd.DataFrame:
    """``REGISTER_MEASURES`` of each completed job (``measure_registers`` on its best checkpoint,
    kept in ``token_norms.json``: ``checkpoint_measures``)."""
    measured = checkpoint_measures(runs, "token_norms.json", REGISTER_MEASURES, lambda best, _: measure_registers(best))
    runs = runs.copy()
    for name in REGISTER_MEASURES:
        runs["token_norm_ratio" if name == "max_over_median" else name] = measured[name]
    return runs


#: The image sizes the rope table also tests with the patches spread over the trained grid.
ROPE_SIZES = (36, 44, 56)


def measure_interpolated(checkpoint: Path, precision: str | None, sizes=ROPE_SIZES) -> dict[str, float]:
    """Test accuracy of a checkpoint on the test images upsampled to ``sizes``, with their patches
    spread over the trained grid (``positions=interpolate``), measured as a user measures it:
    ``python -m vitlab.eval ckpt_path=... image_sizes=[...] positions=interpolate``, at the
    precision the run tested in (None: eval's own)."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "vitlab.eval", f"ckpt_path={checkpoint}",
                   f"image_sizes=[{','.join(map(str, sizes))}]", "positions=interpolate",
                   *([f"trainer.precision={precision}"] if precision else []), "trainer.enable_progress_bar=false",
                   "torch_threads=1", f"hydra.run.dir={out}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    return {f"{size}px": metrics[f"test/acc@{size}px"] for size in sizes}


def add_interpolated_accuracy(runs: pd.DataFrame) -> pd.DataFrame:
    """``interpolated@<size>px`` of each completed job (``measure_interpolated`` on its best
    checkpoint, at the precision its config records, kept in ``interpolated.json``:
    ``checkpoint_measures``)."""
    def measure(best: Path, kept: Path) -> dict:
        config = yaml.safe_load((kept / "config.yaml").read_text()) or {}
        return measure_interpolated(best, (config.get("trainer") or {}).get("precision"))

    fields = tuple(f"{size}px" for size in ROPE_SIZES)
    measured = checkpoint_measures(runs, "interpolated.json", fields, measure)
    runs = runs.copy()
    for size, field in zip(ROPE_SIZES, fields):
        runs[f"interpolated@{size}px"] = measured[field]
    return runs


def add_train_flops(runs: pd.DataFrame) -> pd.DataFrame:
    """``train_flops_per_image`` of each job: from its metrics.json, or, for records written before
    runs counted it, counted on the network its config.yaml builds (a property of the config, the
    same count a run makes: ``vitlab.models.flops_per_image(training=True)``)."""
    from omegaconf import OmegaConf

    from vitlab.config import instantiate_model
    from vitlab.models import flops_per_image

    counted: dict[str, int] = {}
    values = []
    for kept, recorded in zip(runs["kept"], runs.get("train_flops_per_image", pd.Series(None, index=runs.index))):
        if pd.notna(recorded):
            values.append(recorded)
            continue
        config = Path(kept) / "config.yaml"
        if not config.is_file():
            values.append(None)
            continue
        cfg = OmegaConf.load(config)
        key = OmegaConf.to_yaml(cfg.model)
        if key not in counted:
            counted[key] = flops_per_image(instantiate_model(cfg.model), cfg.data.image_size, cfg.data.channels,
                                           training=True)
        values.append(counted[key])
    runs = runs.copy()
    runs["train_flops_per_image"] = values
    return runs


def train_flops_cell(g: Group) -> str:
    """A setting's training forward FLOPs per image, and their share of the evaluation forward."""
    train, full = g.value("train_flops_per_image"), g.value("flops_per_image")
    return "–" if not train else f"{train / 1e6:.1f} ({train / full:.0%})" if full else f"{train / 1e6:.1f}"


def ratio_cell(g: Group, metric: str = "token_norm_ratio") -> str:
    st = g.stat(metric)
    return "–" if not st.n else f"{st.mean:.2f} ± {st.std:.2f}" if st.n > 1 else f"{st.mean:.2f}"


def map_outcome(results) -> str:
    """The MAP head's verdict against mean pooling, in Zhai et al.'s terms."""
    sign = {shown(g.setting["model.pool"]): s for g, s, _ in results}.get("map")
    return {1: "**Reproduced**: the MAP head beats mean pooling",
            0: "**Reproduced in part**: the MAP head is as good as mean pooling (Zhai et al.: as good or better)",
            -1: "**Not reproduced**: the MAP head is worse than mean pooling here",
            None: "Each pooling against mean pooling"}[sign]


def render_registers(groups: list[Group], figure: Callable[[str], Path]):
    md, figs = switch_render("model.reg_tokens", "registers", 0, "registers", "register tokens",
                             lambda r: no_loss(r, "**Reproduced**: registers cost nothing and help here",
                                               "**Reproduced for accuracy**: registers cost nothing here",
                                               "**Not reproduced**: some register counts lose accuracy here"),
                             extra=(("largest / median patch-token norm", ratio_cell),
                                    ("last block: attention to registers (%)",
                                     lambda g: pct_of(g, "attention_to_registers") if g.setting["model.reg_tokens"]
                                     else "–"),
                                    ("last block: peak attention on a patch (x uniform)",
                                     lambda g: ratio_cell(g, "attention_peak"))))(groups, figure)
    with_registers = [g for g in groups if g.setting["model.reg_tokens"] and g.stat("attention_to_registers").n]
    if with_registers:
        def share(g: Group) -> str:
            n, patches = int(g.setting["model.reg_tokens"]), g.value("patches")
            even = f" (an even spread: {100 * n / (n + patches):.1f} %)" if patches else ""
            return f"{n}: {100 * g.stat('attention_to_registers').mean:.1f} %{even}"

        md.append("In the last block the patch queries give the registers this share of their attention: "
                  f"{', '.join(share(g) for g in with_registers)}. The peak column is the largest share one patch "
                  "draws, times the number of patches (1 = uniform); the figure draws where the attention goes. "
                  "Darcet et al. find that registers take over the global role of a few high-norm background "
                  "patches, and with it the attention those drew (Fig. 1, 7).")
    seed0 = {}
    for g in groups:
        jobs = g.jobs[g.jobs["status"].eq("completed") & g.jobs["seed"].eq(0)]
        best = sorted((Path(jobs["dir"].iloc[0]) / "checkpoints").glob("best*.ckpt")) if len(jobs) else []
        if best:
            seed0[f"{g.setting['model.reg_tokens']} registers"] = best[-1]
    path = figure("registers_attention")
    if len(seed0) == len(groups) and len(seed0) > 1:
        figs.append(register_attention_figure(path, seed0).name)
    elif path.is_file():  # drawn by an earlier generation, whose checkpoints this checkout lacks
        figs.append(path.name)
    none = next((g for g in groups if g.setting["model.reg_tokens"] == 0 and g.stat("token_norm_ratio").n), None)
    if none is not None:
        ratio = none.stat("token_norm_ratio").mean
        md.append(f"Without registers the largest output patch token has {ratio:.1f}x the median norm "
                  + ("(no high-norm outliers at this scale: Darcet et al. see them, about 10x, in large models trained "
                     "long, so there is nothing for registers to remove here)." if ratio < 3 else
                     "(high-norm outliers, as Darcet et al. describe; compare the rows with registers)."))
    return md, figs


def render_qk_norm(groups: list[Group], figure: Callable[[str], Path]):
    def failed(g: Group) -> str:
        return str(int(g.jobs["status"].eq("failed").sum()))

    md = [table(groups, lambda g: [shown(g.setting["model.qk_norm"]), f"{g.setting['optimizer.lr']:g}", failed(g)],
                ["qk_norm", "lr", "diverged"])]
    series = {}
    for g in groups:
        if g.stat("test_acc").n:
            series.setdefault(f"qk_norm={shown(g.setting['model.qk_norm'])}", []).append(
                (g.setting["optimizer.lr"], g.stat("test_acc"), ""))
    figs = [errorbar_figure(figure("qk_norm"), "QK-norm against learning rate", series, "learning rate (log)",
                            log_x=True).name] if series else []
    sentences = []
    for lr in sorted({g.setting["optimizer.lr"] for g in groups}):
        at = {bool(g.setting["model.qk_norm"]): g for g in groups if g.setting["optimizer.lr"] == lr}
        if True in at and False in at and judged(at[True]) and judged(at[False]):
            s, text = verdict(at[True].stat("test_acc"), at[False].stat("test_acc"), "qk_norm", "plain")
            sentences.append(f"at lr {lr:g}: " + ("QK-norm is better" if s == 1 else "no clear difference" if s == 0
                                                   else "QK-norm is worse") + f" ({text})")
        elif True in at and False in at and judged(at[True]) and at[False].jobs["status"].eq("failed").any():
            sentences.append(f"at lr {lr:g}: the plain model diverged in {failed(at[False])} of "
                             f"{len(at[False].jobs)} seeds, QK-norm in {failed(at[True])}")
    if sentences:
        md.append("Verdicts, " + "; ".join(sentences) + ". The paper's claim is about the high learning rate: "
                  "QK-norm should hold there where the plain model diverges or loses.")
    return md, figs


def rope_figure(path: Path, groups: list[Group], sizes: tuple[int, ...], interpolated: bool) -> Path:
    """Test accuracy against the test image size, a line per embedding (one colour each): the
    positions extended, and beside it, where measured, interpolated."""
    panels = [("test/acc@{}px", "positions extended (as trained)")]
    if interpolated:
        panels.append(("interpolated@{}px", "positions interpolated (positions=interpolate)"))
    fig = Figure(figsize=(5.2 * len(panels) + 0.6, 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, (metric, title) in zip(axes, panels):
        for i, g in enumerate(groups):
            points = [(28, g.stat("test_acc"))] + [(s, g.stat(metric.format(s))) for s in sizes
                                                   if g.stat(metric.format(s)).n]
            ax.errorbar([p[0] for p in points], [100 * p[1].mean for p in points],
                        yerr=[100 * (p[1].std if p[1].n > 1 else 0) for p in points], marker="o", capsize=4,
                        color=f"C{i}", label=g.setting["model.pos_emb"])
        ax.set(xlabel="test image size (px; trained at 28)", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize="small")
    fig.suptitle("position embedding: tested at the training size and above")
    fig.savefig(path, dpi=100)
    return path


def render_rope(groups: list[Group], figure: Callable[[str], Path]):
    sizes = ROPE_SIZES
    order = ["sincos2d", "learned", "rope2d_axial", "rope2d_mixed", "sincos2d+rope2d_axial", "sincos2d+rope2d_mixed"]
    groups.sort(key=lambda g: order.index(g.setting["model.pos_emb"]) if g.setting["model.pos_emb"] in order else 99)
    interpolated = any(g.stat(f"interpolated@{s}px").n for g in groups for s in sizes)
    md = [table(groups, lambda g: [g.setting["model.pos_emb"]] + [pct_of(g, f"test/acc@{s}px") for s in sizes]
                + ([pct_of(g, f"interpolated@{s}px") for s in sizes] if interpolated else []),
                ["position embedding"] + [f"at {s} px (%)" for s in sizes]
                + ([f"at {s} px, interpolated (%)" for s in sizes] if interpolated else []))]
    md.append("Test accuracy at the training size (28 px) and on the test images upsampled to 36, 44 and 56 px, "
              "their patches placed as each model trained: the fixed embeddings (sincos2d, RoPE) extend their "
              "positions (`positions=extend`), the learned table is resampled over the image."
              + (" *Interpolated*: the same best checkpoints with the patches spread over the trained grid instead "
                 "(`python -m vitlab.eval ... image_sizes=[36,44,56] positions=interpolate`, EVA-02's scheme; "
                 "kept in each job's `interpolated.json`); for the learned table nothing changes."
                 if interpolated else ""))
    plotted = [g for g in groups if g.stat("test_acc").n]
    figs = [rope_figure(figure("rope"), plotted, sizes, interpolated).name] if plotted else []
    parts, summary = [], []
    for metric, where in (("test_acc", "at the training size (28 px)"), ("test/acc@56px", "at 56 px (2x)"),
                          ("interpolated@56px", "at 56 px (2x) with interpolated positions")):
        results = against_base(groups, "model.pos_emb", "sincos2d", metric)
        if results:
            parts.append(f"{where[0].upper()}{where[1:]}: " + "; ".join(text for _, _, text in results))
        rotary = [sign for g, sign, _ in results if "rope" in g.setting["model.pos_emb"]]
        if rotary:
            better = f"{rotary.count(1)} of {len(rotary)} RoPE variants beat sincos2d"
            summary.append(f"{where} " + ("every RoPE variant beats sincos2d" if rotary.count(1) == len(rotary) else
                                          "every RoPE variant is within noise of sincos2d" if not any(rotary) else
                                          f"{better} and none is worse" if min(rotary) >= 0 else
                                          f"{better} and {rotary.count(-1)} "
                                          f"{'is' if rotary.count(-1) == 1 else 'are'} worse"))
        done = [g for g in groups if judged(g) and g.stat(metric).n]
        if done and metric != "test_acc":
            best = max(done, key=lambda g: g.stat(metric).mean)
            summary.append(f"the best {where} is {best.setting['model.pos_emb']}")
    by = {g.setting["model.pos_emb"]: g for g in groups if judged(g)}
    if "rope2d_mixed" in by and "rope2d_axial" in by:
        sign, text = verdict(by["rope2d_mixed"].stat("test_acc"), by["rope2d_axial"].stat("test_acc"), "rope2d_mixed",
                             "rope2d_axial")
        summary.append(("RoPE-Mixed beats RoPE-Axial" if sign == 1 else "RoPE-Mixed and RoPE-Axial tie" if sign == 0
                        else "RoPE-Axial beats RoPE-Mixed") + f" at 28 px ({text})")
    if parts:
        md.append("**Measured**: " + "; ".join(summary) + ". Heo et al. find RoPE-Mixed > RoPE-Axial >= absolute "
                  "embeddings at the training resolution, and RoPE losing much less than absolute embeddings at higher "
                  "resolutions. Here the fixed embeddings (sincos2d, RoPE) are extended to the new grid (positions "
                  "in patches), while a learned table is resampled over the image (as when fine-tuning at a new "
                  "resolution); interpolated, the fixed ones are spread over the image as the learned table is.")
        md.append("Each embedding against sincos2d. " + ". ".join(parts) + ".")
    gains = [(g.setting["model.pos_emb"], g.stat("interpolated@56px").mean - g.stat("test/acc@56px").mean)
             for g in groups if judged(g) and g.setting["model.pos_emb"] != "learned"
             and g.stat("interpolated@56px").n and g.stat("test/acc@56px").n]
    if gains:
        md.append("Interpolated instead of extended, the same checkpoints at 56 px: "
                  + ", ".join(f"{kind} {100 * gain:+.1f}" for kind, gain in gains) + " points (difference of the means).")
    return md, figs


def render_flexivit(groups: list[Group], figure: Callable[[str], Path]):
    sizes = (4, 7, 14)

    def kind(g: Group) -> str:
        return "FlexiViT" if shown(g.setting["model.flexi_patch_sizes"]) != "off" else "fixed"

    groups.sort(key=lambda g: (kind(g) == "FlexiViT", g.setting["model.patch_size"]))
    md = [table(groups, lambda g: [kind(g), str(g.setting["model.patch_size"])]
                + [pct_of(g, f"test/acc@p{s}") for s in sizes],
                ["model", "weights at patch"] + [f"test acc at patch {s} (%)" for s in sizes])]
    md.append("The test acc column is each model at its own patch size; the columns per patch size read the same "
              "weights at that patch size (PI-resized patch embedding, position embedding at the new grid).")
    series = {f"{kind(g)} (weights at {g.setting['model.patch_size']})":
              [(s, g.stat(f"test/acc@p{s}"), "") for s in sizes if g.stat(f"test/acc@p{s}").n]
              for g in groups if g.stat("test/acc@p4").n}
    figs = [errorbar_figure(figure("flexivit"), "one flexible model against one model per patch size", series,
                            "patch size at test").name] if series else []
    flexi = [g for g in groups if kind(g) == "FlexiViT" and judged(g)]
    fixed = {g.setting["model.patch_size"]: g for g in groups if kind(g) == "fixed" and judged(g)}
    if flexi and fixed:
        best = max(flexi, key=lambda g: sum(g.stat(f"test/acc@p{s}").mean for s in sizes))
        parts = [f"{shown(s)}: " + verdict(best.stat(f"test/acc@p{s}"), fixed[s].stat(f"test/acc@p{s}"),
                                           "FlexiViT", f"patch-{s} model")[1] for s in sizes if s in fixed]
        signs = [verdict(best.stat(f"test/acc@p{s}"), fixed[s].stat(f"test/acc@p{s}"), "", "")[0]
                 for s in sizes if s in fixed]
        elsewhere = [fixed[p].stat(f"test/acc@p{s}").mean for p in fixed for s in sizes if s != p]
        flexible = [best.stat(f"test/acc@p{s}").mean for s in sizes]
        collapse = (f"the fixed models collapse away from their own patch size (mean {100 * np.mean(elsewhere):.1f} % "
                    f"there, against {100 * min(flexible):.1f}-{100 * max(flexible):.1f} % for the flexible model at "
                    "every size)")
        md.append((f"**Reproduced**: the flexible model matches or beats the models trained at one patch size, and "
                   f"{collapse}" if min(signs) >= 0 else
                   f"**Reproduced in part**: {collapse}, but each beats the flexible model at its own size"
                   if max(signs) <= 0 else
                   f"**Mixed**: {collapse}; the flexible model beats some of them at their own size and loses to "
                   "others") + ". "
                  f"The flexible model with its weights at patch {best.setting['model.patch_size']} against the model "
                  f"trained at each patch size alone, at that size: " + "; ".join(parts) + ". FlexiViT (Fig. 3) "
                  "matches or beats each such model after long training, and they collapse at other patch sizes.")
    return md, figs



# --------------------------------------------------------------------------- SimpleViT against a DeiT-style ViT
#: The swept key of experiment=ablation/vs_deit (a config group of that experiment) and its settings:
#: (the network, the recipe it trains with), in table order.
VS_DEIT_KEY = "experiment/ablation/vs_deit"
VS_DEIT = {
    "simple_vit": ("SimpleViT: mean pooling, sincos2d, no qkv bias", "ablation (SimpleViT's own)"),
    "deit": ("DeiT-style: class token, learned position embedding, qkv bias", "ablation"),
    "deit_recipe": ("DeiT-style: class token, learned position embedding, qkv bias", "DeiT's"),
}


def own_speed(g: Group) -> float | None:
    """Mean training images/s of the setting's completed jobs trained in this sweep (not reused)."""
    jobs = g.jobs[g.jobs["status"].eq("completed")]
    speeds = pd.to_numeric(jobs[~reused(jobs)].get("train_images_per_s", pd.Series(dtype=float)), errors="coerce")
    return float(speeds.mean()) if speeds.notna().any() else None


def network_of(g: Group) -> str:
    """The ``model.name`` the setting's jobs built (their config.yaml), e.g. simple_vit, deit_tiny_patch16_224."""
    names = g.jobs["model.name"].dropna().unique() if "model.name" in g.jobs else []
    return ", ".join(str(n) for n in names) or "–"


def render_vs_deit(groups: list[Group], figure: Callable[[str], Path]):
    def setting(g: Group) -> str:
        return str(g.setting[VS_DEIT_KEY])

    order = list(VS_DEIT)
    groups.sort(key=lambda g: order.index(setting(g)) if setting(g) in order else len(order))
    md = [table(groups, lambda g: [setting(g), VS_DEIT.get(setting(g), ("–",))[0], network_of(g),
                                   VS_DEIT.get(setting(g), ("–", "–"))[1],
                                   f"{g.value('params'):,.0f}" if g.value("params") else "–"],
                ["setting", "network", "model.name", "recipe", "params"])]
    md.append("Both networks at width 96, depth 4, 4 heads x 24, MLP 192, patch 4 (the DeiT-style one is timm's "
              "VisionTransformer built as `deit_tiny_patch16_224`, resized by `model.kwargs`). DeiT's recipe here: lr "
              "5e-4 x 128/512, warmup over 5/300 of the run, stochastic depth 0.1, RandAugment at magnitude 9 of 10, "
              "random erasing 0.25, MixUp 0.8 / CutMix 1.0; the rest as the ablation recipe "
              "(`conf/experiment/ablation/vs_deit/deit_recipe.yaml` lists what still differs).")
    points = []
    for g in groups:
        if g.stat("test_acc").n:
            speed = own_speed(g)
            points.append((setting(g), g.stat("test_acc"), f"{speed:.0f} img/s" if speed else ""))
    if any(reused(g.jobs).any() for g in groups):
        md.append("Jobs equal to the base setting of the other ablations (SimpleViT under the ablation recipe) "
                  "took those runs' results (`reuse`), so their images/s is not labelled in the figure: the "
                  "networks' speeds side by side are in the README (\"Throughput\", `scripts/bench_timm_vit.py`).")
    figs = [errorbar_figure(figure("vs_deit"), "SimpleViT against a DeiT-style ViT (labels: training images/s)",
                            {"": points}, "setting", categorical=True).name] if points else []
    by = {setting(g): g for g in groups if judged(g)}
    sentences = []
    if "simple_vit" in by and "deit" in by:
        s, text = verdict(by["simple_vit"].stat("test_acc"), by["deit"].stat("test_acc"), "simple_vit", "deit")
        sentences.append(("**Beyer et al.'s direction reproduced**: under one recipe SimpleViT beats the DeiT-style ViT"
                          if s == 1 else
                          "**No clear difference** under one recipe (Beyer et al.: mean pooling and sincos2d each "
                          "gain 1.5 points after 90 ImageNet epochs)" if s == 0 else
                          "**Opposite of Beyer et al.**: under one recipe the DeiT-style ViT beats SimpleViT")
                         + f" ({text}).")
    if "deit" in by and "deit_recipe" in by:
        s, text = verdict(by["deit_recipe"].stat("test_acc"), by["deit"].stat("test_acc"), "deit_recipe", "deit")
        sentences.append("The DeiT-style ViT under DeiT's own recipe against the ablation recipe: "
                         + ("DeiT's recipe is better" if s == 1 else "no clear difference" if s == 0 else
                            "DeiT's recipe is worse at this length") + f" ({text})."
                         + (" Its learning rate and augmentation are set for 300 ImageNet epochs." if s == -1 else ""))
    if "simple_vit" in by and "deit_recipe" in by:
        s, text = verdict(by["simple_vit"].stat("test_acc"), by["deit_recipe"].stat("test_acc"), "simple_vit",
                          "deit_recipe")
        sentences.append("Each network with its own recipe: " + ("SimpleViT is better" if s == 1 else
                                                                  "no clear difference" if s == 0 else
                                                                  "the DeiT-style ViT is better") + f" ({text}).")
    speeds = {k: own_speed(by[k]) for k in ("simple_vit", "deit") if k in by}
    if all(speeds.get(k) for k in ("simple_vit", "deit")):
        sentences.append(f"Training speed under the same recipe, jobs of this sweep: SimpleViT "
                         f"{speeds['simple_vit']:.0f} images/s, the DeiT-style ViT {speeds['deit']:.0f} "
                         f"({speeds['simple_vit'] / speeds['deit']:.2f}x); README, \"Throughput\", says where "
                         "timm's ViT loses its time on a CPU.")
    md += sentences
    return md, figs

ABLATIONS = [
    Ablation("patch_size", "Patch size", ["model.patch_size"],
             "ViT paper (Dosovitskiy et al. 2021), Table 5 / Fig. 5: smaller patches, more compute, better accuracy.",
             render_patch_size, glance=("model.patch_size", 4)),
    Ablation("patch_size_compute", "Patch size at equal training compute", ["model.patch_size"],
             "ViT paper, Fig. 5 / Table 5 compare at matched pre-training compute: here every patch size trains for "
             "the same training FLOPs (`budget.flops`): those of one epoch of patch 4 (5.3e12), or of ten (5.3e13).",
             lambda groups, figure: render_patch_size(groups, figure, compute=True),
             long_args="budget.flops=5.3e13 sweep=ablation_patch_size_compute_10ep trainer.precision=32-true",
             glance=("model.patch_size", 4)),
    Ablation("pos_emb", "Position embedding", ["model.pos_emb"],
             "ViT paper, Table 8: none 61.4 vs learned 1-D 64.2 vs 2-D 64.0 (five-shot ImageNet); Beyer et al. 2022, "
             "Table 1: a learned embedding instead of fixed sincos costs 1.5 points at 90 epochs.", render_pos_emb,
             glance=("model.pos_emb", "sincos2d")),
    Ablation("pool", "Mean pooling vs class token", ["model.pool", "optimizer.lr"],
             "ViT paper, Appendix D.3: equal once each has its own learning rate; Beyer et al. 2022, Table 1: the "
             "class token costs 1.5 points.", render_pool,
             glance=("model.pool", "mean")),
    Ablation("depth_width", "Depth x width at matched FLOPs", ["shape"],
             "ViT paper, Fig. 8 and Zhai et al. 2022: depth is the most useful dimension to scale, up to a point.",
             render_depth_width, glance=("shape", "d4_w96")),
    Ablation("heads", "Number of heads at fixed inner width", ["model.heads"],
             "Vaswani et al. 2017, Table 3 (A): one head is worse than the best; too many heads lose again.",
             render_heads, glance=("model.heads", 4)),
    Ablation("registers", "Register tokens", ["model.reg_tokens"],
             "Darcet et al. 2024, Fig. 8 and Table 2: registers keep or slightly raise accuracy, and remove the output "
             "patch tokens of about 10x the usual norm (Fig. 3) that ViTs without them grow.",
             render_registers, metrics=("token_norm_ratio", "attention_to_registers", "attention_peak", "patches"),
             prepare=add_register_measures, args="reuse=null",
             glance=("model.reg_tokens", 0)),
    Ablation("qk_norm", "QK-norm against learning rate", ["model.qk_norm", "optimizer.lr"],
             "Dehghani et al. 2023 (ViT-22B), Sec. 2 and Fig. 2: without LayerNorm on queries and keys the attention "
             "logits grow and training diverges at high learning rates; with it training is stable.",
             render_qk_norm, glance=("model.qk_norm", False)),
    Ablation("layer_scale", "LayerScale", ["model.layer_scale"],
             "Touvron et al. 2021 (CaiT), Tables 1 and 3: LayerScale lets deep ViTs train better; its gain grows with "
             "depth (at depth 4, little is expected).",
             switch_render("model.layer_scale", "layer_scale", None, "layer_scale", "LayerScale initial value",
                           lambda r: no_loss(r, "**Helps here**", "**No clear effect at this depth**, as CaiT's results "
                                             "predict for shallow models", "**Hurts here** at this depth")),
             glance=("model.layer_scale", None)),
    Ablation("rope", "2-D rotary position embedding", ["model.pos_emb"],
             "Heo et al. 2024, Fig. 3 and Table 2: RoPE-Mixed > RoPE-Axial >= absolute embeddings at the training "
             "resolution, and RoPE extrapolates to larger images far better.", render_rope,
             metrics=tuple(f"{kind}@{size}px" for kind in ("test/acc", "interpolated") for size in ROPE_SIZES),
             prepare=add_interpolated_accuracy, glance=("model.pos_emb", "sincos2d")),
    Ablation("mlp", "GELU against SwiGLU MLP", ["model.mlp"],
             "Shazeer 2020, Table 1: SwiGLU at equal parameters lowers the loss (language models); EVA-02 and DINOv3 "
             "use it in ViTs.",
             switch_render("model.mlp", "MLP", "gelu", "mlp", "MLP",
                           lambda r: no_loss(r, "**Reproduced**: SwiGLU is better", "**No clear difference** here",
                                             "**Opposite**: SwiGLU is worse here"),
                           extra=(("params", lambda g: f"{g.value('params'):.0f}" if g.value("params") else "–"),)),
             glance=("model.mlp", "gelu")),
    Ablation("patch_dropout", "PatchDropout", ["model.patch_dropout"],
             "Liu et al. 2023, Table 1 and Fig. 3: dropping 25-50 % of the patches in training costs little or no "
             "accuracy and saves compute in proportion.",
             switch_render("model.patch_dropout", "dropped share", 0.0, "patch_dropout", "PatchDropout",
                           lambda r: no_loss(r, "**Better than without**", "**Reproduced**: no clear accuracy cost",
                                             "**A cost in accuracy** at some shares")
                           + "; the training MFLOPs column gives the compute each share saves (a training step's "
                             "forward, counted), the images/s column the speed it bought on this shared machine",
                           extra=(("training MFLOPs/img (of eval)", train_flops_cell),)),
             args="reuse=null", metrics=("train_flops_per_image",), prepare=add_train_flops,
             glance=("model.patch_dropout", 0.0)),
    Ablation("map_pool", "Pooling: mean, class token, attention (MAP)", ["model.pool"],
             "Zhai et al. 2022 (Scaling ViTs), Sec. 3.3 and Fig. 4: a MAP head is as good as or better than a class "
             "token or mean pooling.",
             switch_render("model.pool", "pool", "mean", "map_pool", "pooling", map_outcome),
             glance=("model.pool", "mean")),
    Ablation("patch_norm", "LayerNorm over the patch pixels in the stem", ["model.patch_norm"],
             "No paper: vit-pytorch's SimpleViT normalises each patch's pixels before the embedding; Beyer et al. "
             "2022 and big_vision do not. FlexiViT needs the plain stem.",
             switch_render("model.patch_norm", "patch_norm", True, "patch_norm", "patch LayerNorm",
                           lambda r: no_loss(r, "**The plain stem is better** here", "**No clear difference**: the "
                                             "patch LayerNorm can be dropped (as FlexiViT needs)",
                                             "**The patch LayerNorm helps** here")),
             glance=("model.patch_norm", True)),
    Ablation("flexivit", "FlexiViT: one model for every patch size", ["model.patch_size", "model.flexi_patch_sizes"],
             "Beyer et al. 2023 (FlexiViT), Fig. 1 and 3: one model trained with a random patch size per step matches "
             "the models trained at each size alone, which collapse at other sizes.", render_flexivit,
             metrics=("test/acc@p4", "test/acc@p7", "test/acc@p14")),
    Ablation("vs_deit", "SimpleViT against a DeiT-style ViT", [VS_DEIT_KEY],
             "Beyer et al. 2022 (Better plain ViT baselines for ImageNet-1k), Table 1, ViT-S/16 top-1 at 90 / 150 / "
             "300 epochs: their plain ViT (mean pooling, sincos2d, batch 1024, RandAugment + MixUp) 76.5 / 78.5 / "
             "80.0 %; with a class token instead 75.0 / 76.9 / 78.2, with a learned position embedding instead 75.0 / "
             "78.0 / 79.6; the original ViT setup (class token, learned embedding, batch 4096, MLP head) 66.8 / 67.2 "
             "/ 67.1, with RandAugment + MixUp 71.6 / 74.8 / 76.1. The DeiT-style ViT here has both of the changes "
             "of the first two rows (and qkv bias); the table has no row with both alone.",
             render_vs_deit, short_args="reuse=null"),
]


def glance_cell(a: Group | None, b: Group | None) -> str:
    """A setting against the base in points, bold where Welch's t-test calls it real; – before both
    have the seeds a verdict needs."""
    if a is None or b is None or not (judged(a) and judged(b)):
        return "–"
    diff, se, p = welch(a.stat("test_acc"), b.stat("test_acc"))
    change = f"{diff:+.2f} ± {se:.2f}"
    return f"**{change}** (p = {p_value(p)})" if p < ALPHA else f"{change} (p = {p_value(p)})"


def at_a_glance(collected: dict[tuple[str, str], list[Group]]) -> list[str]:
    """The page's summary: every setting of each summed-up ablation against its base setting (the
    ablation's other keys equal), in test-accuracy points, at 10 epochs and at 1."""
    rows = []
    for ablation in ABLATIONS:
        if ablation.glance is None:
            continue
        key, base = ablation.glance
        by_length = [collected.get((ablation.name, suffix), []) for suffix, _, _ in LENGTHS]

        def others(g: Group) -> tuple:
            return tuple((k, shown(v)) for k, v in g.setting.items() if k != key)

        # Per length: (value, the other keys' values) -> setting; a row per such pair off the base.
        finds = [{(shown(g.setting[key]), others(g)): g for g in groups} for groups in by_length]
        for value, rest in dict.fromkeys(pair for find in finds for pair in find if pair[0] != shown(base)):
            cells = [glance_cell(find.get((value, rest)), find.get((shown(base), rest))) for find in finds]
            held = ", ".join(f"{k.rsplit('.', 1)[-1]} {v}" for k, v in rest)
            rows.append([ablation.title, f"{key.rsplit('.', 1)[-1]}={value}", f"{shown(base)}"
                         + (f" ({held})" if held else ""), *cells])
    if not rows:
        return []
    columns = ["ablation", "setting", "against", *(f"{length}: test acc change (points)" for _, _, length in LENGTHS)]
    return ["## At a glance", "",
            "Each setting against the ablation's base setting (its other keys held equal): the difference of the "
            "mean test accuracy over seeds ± its standard error, in points; **bold** where Welch's t-test gives "
            f"p < {ALPHA:g}; – where either side has fewer than {MIN_SEEDS} seeds so far. FlexiViT and the DeiT-style "
            "ViT compare other things: see their sections. Generated from the tables below.", "",
            markdown(pd.DataFrame(rows, columns=columns)), ""]


def keep_records(sweep: Path, kept: Path) -> None:
    """Copy the records of the sweep's completed jobs (and its multirun.yaml) into ``kept``."""
    if not sweep.is_dir():
        return
    kept.mkdir(parents=True, exist_ok=True)
    if (sweep / "multirun.yaml").is_file():
        shutil.copy2(sweep / "multirun.yaml", kept / "multirun.yaml")
    for job in job_dirs(sweep):
        metrics = read_metrics(job) or {}
        # A job kept before stays as it was: a later sweep that skipped it rewrote its overrides.yaml.
        if metrics.get("status") != "completed" or read_metrics(kept / job.name) == metrics:
            continue
        for name in RECORDS:
            if (job / name).is_file():
                (kept / job.name / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(job / name, kept / job.name / name)


def planned_jobs(sweep: Path) -> int | None:
    """How many jobs the sweep's grid has (the product of its swept values), from multirun.yaml."""
    path = sweep / "multirun.yaml"
    params = ((yaml.safe_load(path.read_text()) or {}).get("hydra", {}).get("sweeper", {}).get("params")
              if path.is_file() else None)
    if not params:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    overrides = parser.parse_overrides([f"{key}={value}" for key, value in params.items()])
    return math.prod(len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1 for o in overrides)


def previous_sections(page: Path) -> dict[str, list[str]]:
    """The body of each ``## `` section of the page as last generated, by heading."""
    sections: dict[str, list[str]] = {}
    heading = None
    for line in page.read_text().splitlines() if page.is_file() else []:
        if line.startswith("## "):
            heading = line
            sections[heading] = []
        elif heading:
            sections[heading].append(line)
    return sections


def precision_note(runs: pd.DataFrame) -> str:
    """The end of a table's summary line: the trainer precision its completed jobs ran in, and a
    warning when they ran in more than one (then a gap between settings may be the precision's)."""
    counts = Counter(str(((job_config(d) or {}).get("trainer") or {}).get("precision", "?"))
                     for d, status in zip(runs["kept"], runs["status"]) if status == "completed")
    counts.pop("?", None)
    if len(counts) > 1:
        mixed = ", ".join(f"{p}: {n} jobs" for p, n in sorted(counts.items()))
        return (f"; **precisions mixed** ({mixed}): a difference between settings may be the precision's, "
                "so run the rest in the precision of the first jobs.")
    return f"; precision {next(iter(counts))}." if counts else "."


def section(ablation: Ablation, suffix: str, heading: str, length: str, multirun: Path, figures: Path,
            previous: dict[str, list[str]], carried: list[str],
            collected: dict[tuple[str, str], list[Group]]) -> list[str]:
    """The page's section of one sweep, from its kept records; the last generation's text where the
    records are gone (its heading is then added to ``carried``). Its settings go into ``collected``
    under (name, suffix)."""
    name = f"ablation_{ablation.name}{suffix}"
    args = "".join(f" {a}" for a in (ablation.args, ablation.long_args if suffix else ablation.short_args) if a)
    title = f"## {ablation.title}, {heading}"
    lines = [title, "", f"Paper: {ablation.paper}", "",
             f"Command: `scripts/ablate.sh {ablation.name}{args}` (config "
             f"`conf/experiment/ablation/{ablation.name}.yaml`, {length}).", ""]
    kept = figures / "runs" / name
    keep_records(multirun / name, kept)
    if not kept.is_dir() or not job_dirs(kept):
        old = previous.get(title, [])
        if any(line.startswith("| ") for line in old):  # a table: results of a sweep whose records are gone
            carried.append(title)
            return [title, *old]
        return lines + ["Not run yet.", ""]
    runs = load_runs(kept, [*ablation.keys, "seed"])
    # Checkpoints (the learned position embedding) stay in the sweep's own folder, where present.
    runs["kept"] = runs["dir"]
    runs["dir"] = [multirun / name / d.name if (multirun / name / d.name).is_dir() else d for d in runs["dir"]]
    # A job that took the results of the same run in another sweep (reuse) cost no time here.
    took = reused(runs)
    total = pd.to_numeric(runs["wall_time_s"][~took], errors="coerce").sum()
    if ablation.prepare is not None:
        runs = ablation.prepare(runs)
    groups = read_sweep(runs, ablation.keys, METRICS + ablation.metrics)
    collected[(ablation.name, suffix)] = groups
    md, figs = ablation.render(groups, lambda base: figures / f"{base}{suffix}.png")
    if any(g.stat("test_acc").n == 1 for g in groups):
        md.insert(1, f"Settings with fewer than {MIN_SEEDS} completed seeds are in the table and figure but in no "
                     "verdict: their spread over seeds is not known yet.")
    done, planned = (runs["status"] == "completed").sum(), planned_jobs(kept) or len(runs)
    machines = sorted(set(runs["machine"].dropna())) if "machine" in runs else []
    shared = (f" ({took.sum()} of them the same run as a job of another sweep, whose results they took: "
              "`reused_from` in their metrics.json)" if took.any() else "")
    lines += [f"{done} of {planned} jobs completed{shared}; {total / 60:.0f} min of job time in all"
              + (f", on {' and '.join(machines)}" if machines else "") + precision_note(runs), ""]
    lines += [item for text in md for item in (text, "")]
    return lines + [item for fig in figs for item in (f"![{Path(fig).stem}](ablations/{fig})", "")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--multirun", type=Path, default=Path("outputs/multirun"), help="folder of the ablation_* sweeps")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where ablations.md and figures go")
    args = parser.parse_args(argv)
    figures = args.docs / "ablations"
    figures.mkdir(parents=True, exist_ok=True)
    previous = previous_sections(args.docs / "ablations.md")
    carried: list[str] = []
    collected: dict[tuple[str, str], list[Group]] = {}
    body = [line for ablation in ABLATIONS for suffix, heading, length in LENGTHS
            for line in section(ablation, suffix, heading, length, args.multirun, figures, previous, carried,
                                collected)]
    old_rule = (" (sections carried over from an earlier generation, whose records are gone, used the rule of that "
                "time: beyond twice the standard error)" if carried else "")
    lines = [
        "# Ablations on Fashion-MNIST",
        "",
        "Generated by `python scripts/ablation_report.py` from the sweeps that `scripts/ablate.sh <name>` runs "
        f"(last generated {datetime.now():%Y-%m-%d %H:%M}); do not edit by hand. Each ablation changes one thing "
        "from the shared scale of `conf/experiment/ablation/base.yaml` (SimpleViT width 96, depth 4, 4 heads x 24, "
        "MLP 192, patch 4; the default recipe), trained for 10 epochs and, as early training, for 1, and runs 3 "
        "seeds. Tables give mean ± sample std over "
        "seeds of the test accuracy (best-validation checkpoint) and of the best validation accuracy; a difference "
        f"is called real only when Welch's two-sided t-test over the seeds gives p < 0.05{old_rule}. The records "
        "of every completed job are "
        "kept in `docs/ablations/runs/`. Times are per job, two or three jobs side by side with one thread "
        "each (the count each sweep was given), on a "
        f"machine shared with other work (this page last computed on {cpu_name()}): compare them within a table, "
        "not across.",
        "",
        *at_a_glance(collected),
        *body,
    ]
    (args.docs / "ablations.md").write_text("\n".join(lines))
    print(f"wrote {args.docs / 'ablations.md'} and figures in {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
