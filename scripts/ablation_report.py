"""Write ``docs/ablations.md`` and its figures from the ablation sweeps' results.

    python scripts/ablation_report.py [--multirun outputs/multirun] [--docs docs]

Reads ``<multirun>/ablation_<name>/`` (the folders ``scripts/ablate.sh <name>`` fills: one job
folder per setting and seed, each with ``metrics.json``), and writes per ablation a table of
mean ± sample std over seeds, a figure, and a sentence on whether the paper's direction was
reproduced, judged from the numbers: a difference counts only when it exceeds twice its
standard error. Nothing in the document is typed by hand; ablations not run yet are listed
with their command. Run it again after any sweep to refresh the page.
"""

from __future__ import annotations

import argparse
import math
import sys
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

from vitlab.budget import cpu_name
from vitlab.models.simple_vit import posemb_sincos_2d
from vitlab.results import group_stats, job_dirs, load_runs
from vitlab.summarize import markdown

ROOT = Path(__file__).resolve().parents[1]
#: What the tables and verdicts use: mean ± std over the completed jobs of each setting.
METRICS = ("test_acc", "best_val_acc", "flops_per_image", "params", "train_images_per_s", "wall_time_s")


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


def verdict(a: Stat, b: Stat, a_name: str, b_name: str) -> tuple[int, str]:
    """(+1 if a is better beyond noise, -1 if worse, 0 within noise; a phrase saying so)."""
    diff, se = difference(a, b)
    text = f"{a_name} − {b_name} = {diff:+.2f} ± {se:.2f} points"
    if abs(diff) > 2 * se:
        return (1 if diff > 0 else -1), text
    return 0, text + " (within twice the standard error: no clear difference)"


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


def read_sweep(runs: pd.DataFrame, keys: list[str]) -> list[Group]:
    """The settings of ``keys`` (all swept keys but the seed) among a sweep's jobs, sorted by value."""
    jobs, stats = dict(list(runs.groupby(keys, sort=False, dropna=False))), group_stats(runs, keys, METRICS)
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


def plot_pos_emb_similarity(embeddings: dict[str, np.ndarray], grid: tuple[int, int], path: str | Path) -> Path:
    """Cosine similarity of each patch's position embedding with every other patch's, one
    panel per embedding (as in the ViT paper's Figure 7): panel (i, j) of a grid shows the
    similarity of patch (i, j) with all patches, laid out as the image.

    ``embeddings`` maps a label to an array of shape (rows * cols, dim), patches in row-major order.
    """
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
    fig.savefig(path, dpi=100)
    return Path(path)


# --------------------------------------------------------------------------- ablations
@dataclass
class Ablation:
    name: str
    title: str
    keys: list[str]
    paper: str
    render: Callable[[list[Group], Path], tuple[list[str], list[str]]]  # -> (markdown lines, figure names)


def table(groups: list[Group], label: Callable[[Group], list[str]], header: list[str]) -> str:
    rows = []
    for g in groups:
        flops, speed, wall = g.value("flops_per_image"), g.stat("train_images_per_s"), g.stat("wall_time_s")
        rows.append(label(g) + [
            f"{g.completed}/{len(g.jobs)}", g.stat("test_acc").pct(), g.stat("best_val_acc").pct(),
            f"{flops / 1e6:.1f}" if flops else "–", f"{speed.mean:.0f}" if speed.n else "–",
            f"{wall.mean:.0f}" if wall.n else "–",
        ])
    columns = header + ["seeds", "test acc (%)", "best val acc (%)", "MFLOPs/img", "images/s", "job time (s)"]
    return markdown(pd.DataFrame(rows, columns=columns))


def images_seen(g: Group) -> str:
    """Training images of a compute-matched job (``budget.images``), in thousands."""
    plans = [b for b in g.jobs.get("budget", []) if isinstance(b, dict)]
    return f"{plans[0]['images'] / 1000:.1f}k" if plans else "–"


def render_patch_size(groups: list[Group], docs: Path, compute: bool = False):
    image = 28
    label = (lambda g: [str(g.setting["model.patch_size"]), str((image // g.setting["model.patch_size"]) ** 2)]
             + ([images_seen(g)] if compute else []))
    md = [table(groups, label, ["patch", "tokens"] + (["images seen"] if compute else []))]
    points = [(g.value("flops_per_image") / 1e6, g.stat("test_acc"), f"p{g.setting['model.patch_size']}")
              for g in groups if g.stat("test_acc").n and g.value("flops_per_image")]
    name, title = ("patch_size_compute", "patch size at equal training FLOPs") if compute else (
        "patch_size", "patch size: accuracy against compute")
    figs = [errorbar_figure(docs / f"{name}.png", title, {"": points},
                            "forward MFLOPs per image (log)", log_x=True).name] if points else []
    done = [g for g in groups if g.stat("test_acc").n]
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
                          "A likely reason (not tested here): the paper compares models trained to convergence, and at a "
                          "budget of one epoch fewer, larger tokens learn faster while the extra compute of small "
                          "patches has not paid yet"))
        elif all(s >= 0 for s in better) and any(s == 1 for s in better):
            outcome = "**Reproduced in direction**: accuracy never drops with a smaller patch, though not every step is beyond noise"
        else:
            best = max(done, key=lambda g: g.stat("test_acc").mean)
            outcome = (f"**Not reproduced across the whole range**: the best is patch {best.setting['model.patch_size']}; "
                       "smaller is not better at every step")
        md.append(f"{outcome} ({'; '.join(t for _, t in pairs)}).")
    return md, figs


def render_pos_emb(groups: list[Group], docs: Path):
    order = {"sincos2d": 0, "learned": 1, "none": 2}
    groups.sort(key=lambda g: order.get(g.setting["model.pos_emb"], 9))
    md = [table(groups, lambda g: [str(g.setting["model.pos_emb"])], ["position embedding"])]
    by = {g.setting["model.pos_emb"]: g.stat("test_acc") for g in groups if g.stat("test_acc").n}
    points = [(k, v, "") for k, v in by.items()]
    figs = [errorbar_figure(docs / "pos_emb.png", "position embedding", {"": points}, "position embedding",
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
    sim, notes = pos_emb_similarity(groups, docs)
    if sim:
        figs.append(sim)
        md.append("Structure of the embeddings in the figure below (the ViT paper's Fig. 7 shows learned embeddings "
                  "that end up encoding rows and columns): " + "; ".join(notes) + ".")
    return md, figs


def pos_emb_similarity(groups: list[Group], docs: Path) -> tuple[str | None, list[str]]:
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
            ckpt = sorted((job["dir"] / "checkpoints").glob("best*.ckpt"))
            if not ckpt:
                continue
            state = torch.load(ckpt[-1], map_location="cpu", weights_only=True)["state_dict"]
            embeddings[f"learned (seed {job['seed']}, best checkpoint)"] = state["net.pos_embedding"].float().numpy()
    if not embeddings:
        return None, []
    notes = [f"{label}: {neighbour_contrast(emb, grid)}" for label, emb in embeddings.items()]
    return plot_pos_emb_similarity(embeddings, grid, docs / "pos_emb_similarity.png").name, notes


def neighbour_contrast(emb: np.ndarray, grid: tuple[int, int]) -> str:
    """How much 2-D structure an embedding has: the mean cosine similarity of patches next to
    each other against that of patches three or more rows or columns apart."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    distance = np.maximum(abs(rows[:, None] - rows[None]), abs(cols[:, None] - cols[None]))
    near, far = similarity[distance == 1].mean(), similarity[distance >= 3].mean()
    return f"mean cosine similarity {near:.2f} between neighbouring patches, {far:.2f} between patches 3 or more apart"


def render_pool(groups: list[Group], docs: Path):
    md = [table(groups, lambda g: [str(g.setting["model.pool"]), f"{g.setting['optimizer.lr']:g}"], ["pool", "lr"])]
    series, best = {}, {}
    for g in groups:
        if g.stat("test_acc").n:
            series.setdefault(g.setting["model.pool"], []).append((g.setting["optimizer.lr"], g.stat("test_acc"), ""))
            pool = g.setting["model.pool"]
            # Each pooling at its own learning rate, chosen on validation accuracy (not test).
            if pool not in best or g.stat("best_val_acc").mean > best[pool].stat("best_val_acc").mean:
                best[pool] = g
    figs = [errorbar_figure(docs / "pool.png", "pooling against learning rate", series, "learning rate (log)",
                            log_x=True).name] if series else []
    if "mean" in best and "cls" in best:
        m, c = best["mean"], best["cls"]
        s, text = verdict(m.stat("test_acc"), c.stat("test_acc"),
                          f"mean (lr {m.setting['optimizer.lr']:g})", f"cls (lr {c.setting['optimizer.lr']:g})")
        md.append("Each pooling at the learning rate with its best mean validation accuracy: " + (
            "**Beyer et al.'s direction reproduced**: mean pooling beats the class token" if s == 1 else
            "**The ViT paper's finding reproduced**: tuned separately, the two poolings tie" if s == 0 else
            "**Opposite of Beyer et al.**: the class token is better here") + f" ({text}).")
    return md, figs


def render_depth_width(groups: list[Group], docs: Path):
    def depth(g):
        return int(str(g.setting["shape"]).split("_")[0][1:])

    groups.sort(key=depth)
    md = [table(groups, lambda g: [str(g.setting["shape"]), str(depth(g)), f"{g.value('params'):.0f}" if g.value("params") else "–"],
                ["shape", "depth", "params"])]
    points = [(depth(g), g.stat("test_acc"), str(g.setting["shape"])) for g in groups if g.stat("test_acc").n]
    figs = [errorbar_figure(docs / "depth_width.png", "depth x width at matched FLOPs", {"": points}, "depth (log)",
                            log_x=True).name] if points else []
    done = [g for g in groups if g.stat("test_acc").n]
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


def render_heads(groups: list[Group], docs: Path):
    md = [table(groups, lambda g: [str(g.setting["model.heads"]), str(96 // g.setting["model.heads"])],
                ["heads", "dim per head"])]
    points = [(g.setting["model.heads"], g.stat("test_acc"), "") for g in groups if g.stat("test_acc").n]
    figs = [errorbar_figure(docs / "heads.png", "heads at fixed inner width", {"": points}, "heads (log)",
                            log_x=True).name] if points else []
    done = [g for g in groups if g.stat("test_acc").n]
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


ABLATIONS = [
    Ablation("patch_size", "Patch size", ["model.patch_size"],
             "ViT paper (Dosovitskiy et al. 2021), Table 5 / Fig. 5: smaller patches, more compute, better accuracy.",
             render_patch_size),
    Ablation("patch_size_compute", "Patch size at equal training compute", ["model.patch_size"],
             "ViT paper, Fig. 5 / Table 5 compare at matched pre-training compute: here every patch size trains for "
             "the same 5.3e12 training FLOPs (`budget.flops`), one epoch of patch 4.",
             lambda groups, docs: render_patch_size(groups, docs, compute=True)),
    Ablation("pos_emb", "Position embedding", ["model.pos_emb"],
             "ViT paper, Table 8: none 61.4 vs learned 1-D 64.2 vs 2-D 64.0 (five-shot ImageNet); Beyer et al. 2022, "
             "Table 1: a learned embedding instead of fixed sincos costs 1.5 points at 90 epochs.", render_pos_emb),
    Ablation("pool", "Mean pooling vs class token", ["model.pool", "optimizer.lr"],
             "ViT paper, Appendix D.3: equal once each has its own learning rate; Beyer et al. 2022, Table 1: the "
             "class token costs 1.5 points.", render_pool),
    Ablation("depth_width", "Depth x width at matched FLOPs", ["shape"],
             "ViT paper, Fig. 8 and Zhai et al. 2022: depth is the most useful dimension to scale, up to a point.",
             render_depth_width),
    Ablation("heads", "Number of heads at fixed inner width", ["model.heads"],
             "Vaswani et al. 2017, Table 3 (A): one head is worse than the best; too many heads lose again.",
             render_heads),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--multirun", type=Path, default=Path("outputs/multirun"), help="folder of the ablation_* sweeps")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where ablations.md and figures go")
    args = parser.parse_args(argv)
    figures = args.docs / "ablations"
    figures.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Ablations on Fashion-MNIST",
        "",
        "Generated by `python scripts/ablation_report.py` from the sweeps that `scripts/ablate.sh <name>` runs "
        f"(last generated {datetime.now():%Y-%m-%d %H:%M}); do not edit by hand. Each ablation changes one thing "
        "from the shared scale of `conf/experiment/ablation/base.yaml` (SimpleViT width 96, depth 4, 4 heads x 24, "
        "MLP 192, patch 4; the default recipe; 1 epoch) and runs 3 seeds. Tables give mean ± sample std over "
        "seeds of the test accuracy (best-validation checkpoint) and of the best validation accuracy; a difference "
        "is called real only when it exceeds twice its standard error. Times are per job, measured on "
        f"{cpu_name()} ({torch.get_num_threads()} threads visible), two jobs side by side with one thread each, "
        "on a machine shared with other work: compare them within a table, not across.",
        "",
    ]
    for ablation in ABLATIONS:
        sweep = args.multirun / f"ablation_{ablation.name}"
        lines += [f"## {ablation.title}", "", f"Paper: {ablation.paper}", "",
                  f"Command: `scripts/ablate.sh {ablation.name}` (config `conf/experiment/ablation/{ablation.name}.yaml`).",
                  ""]
        if not sweep.is_dir() or not job_dirs(sweep):
            lines += ["Not run yet.", ""]
            continue
        runs = load_runs(sweep, [*ablation.keys, "seed"])
        total = pd.to_numeric(runs["wall_time_s"], errors="coerce").sum()
        md, figs = ablation.render(read_sweep(runs, ablation.keys), figures)
        lines += [f"{(runs['status'] == 'completed').sum()} of {len(runs)} jobs completed; "
                  f"{total / 60:.0f} min of job time in all.", ""]
        lines += [item for text in md for item in (text, "")]
        lines += [item for fig in figs for item in (f"![{Path(fig).stem}](ablations/{fig})", "")]
    (args.docs / "ablations.md").write_text("\n".join(lines))
    print(f"wrote {args.docs / 'ablations.md'} and figures in {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
