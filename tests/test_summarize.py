"""Sweep summaries: a real 2x2 multirun on Fashion-MNIST slices, then a job broken by hand."""

import csv
import re
import shutil
import statistics

import pandas as pd
from conftest import SLICE, run_entry

from vitlab.plots import plot_run_curves, plot_sweep_curves
from vitlab.results import group_stats, key_columns, load_runs
from vitlab.rundir import read_metrics, write_json
from vitlab.summarize import fmt_stat

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def flat(markdown):
    """Markdown tables with the cells' padding taken out: ``| 4 | 2/2 | ...``."""
    return re.sub(r" +", " ", markdown)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, path


def set_seed(job, seed):
    path = job / ".hydra" / "overrides.yaml"
    path.write_text(re.sub(r"seed=\d+", f"seed={seed}", path.read_text()))


def grouped_acc_cell(rows, patch):
    """The grouped table's test_acc cell of a patch size, from the completed rows of summary.csv."""
    accs = [float(r["test_acc"]) for r in rows if r["model.patch_size"] == patch and r["status"] == "completed"]
    return f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f} (n={len(accs)})"


def test_sweep_summary_from_the_multirun_callback_and_the_cli(tmp_path, data_dir):
    sweep_args = ("-m", "model.patch_size=4,7", "seed=0,1", *SLICE, "trainer.max_epochs=1")
    result = run_entry("vitlab.train", *sweep_args, cwd=tmp_path, data_dir=data_dir)
    (sweep,) = tmp_path.glob("outputs/multirun/*/*")

    # Written by SweepCallback.on_multirun_end into the sweep's own folder.
    rows = read_csv(sweep / "summary.csv")
    assert [r["job"] for r in rows] == [
        "0_model.patch_size=4,seed=0",
        "1_model.patch_size=4,seed=1",
        "2_model.patch_size=7,seed=0",
        "3_model.patch_size=7,seed=1",
    ]
    assert list(rows[0])[:3] == ["job", "model.patch_size", "seed"]
    assert [(r["model.patch_size"], r["seed"]) for r in rows] == [("4", "0"), ("4", "1"), ("7", "0"), ("7", "1")]
    assert {r["status"] for r in rows} == {"completed"} and all(r["error"] == "" for r in rows)
    for row in rows:
        metrics = read_metrics(sweep / row["job"])
        assert float(row["test_acc"]) == metrics["test/acc"] and float(row["best_val_acc"]) == metrics["best_val_acc"]
        assert int(row["params"]) == metrics["params"] and row["epochs"] == "1"

    # The same through the results layer: a row per job, the swept keys as typed columns.
    runs = load_runs(sweep)
    assert list(runs["job"]) == [r["job"] for r in rows] and key_columns(runs) == ["model.patch_size", "seed"]
    assert list(runs["model.patch_size"]) == [4, 4, 7, 7] and list(runs["seed"]) == [0, 1, 0, 1]
    assert list(runs["test_acc"]) == [float(r["test_acc"]) for r in rows]

    summary = flat((sweep / "summary.md").read_text())
    assert "Overrides: `model.patch_size=4,7 seed=0,1 trainer.max_epochs=2 " in summary, "the sweep's command line"
    for patch in ("4", "7"):
        assert f"| {patch} | 2/2 | " in summary and grouped_acc_cell(rows, patch).endswith("(n=2)")
        assert grouped_acc_cell(rows, patch) in summary
    assert "| 4 | 2/2 | " in flat(result.stdout), "the grouped table is printed"

    assert_png(sweep / "metric_vs_model.patch_size.png")
    assert_png(sweep / "curves_all.png")
    assert not (sweep / "metric_vs_seed.png").exists()
    for row in rows:
        assert_png(sweep / row["job"] / "curves.png")

    # A job that failed, and one that never wrote metrics.json: reported, the rest unchanged.
    failed = sweep / "4_model.patch_size=7,seed=2"
    shutil.copytree(sweep / rows[3]["job"], failed)
    (failed / "curves.png").unlink()
    set_seed(failed, 2)
    metrics = read_metrics(failed)
    metrics.update(status="failed", error="RuntimeError: out of memory")
    write_json(failed / "metrics.json", metrics)
    missing = sweep / "5_model.patch_size=4,seed=2"
    shutil.copytree(sweep / rows[1]["job"] / ".hydra", missing / ".hydra")
    set_seed(missing, 2)

    result = run_entry("vitlab.summarize", str(sweep), cwd=tmp_path, data_dir=data_dir)
    rows = read_csv(sweep / "summary.csv")
    assert [(r["job"][0], r["seed"], r["status"], r["error"]) for r in rows[4:]] == [
        ("4", "2", "failed", "RuntimeError: out of memory"),
        ("5", "2", "missing", ""),
    ]
    summary = flat((sweep / "summary.md").read_text())
    assert "| failed | RuntimeError: out of memory |" in summary
    for patch in ("4", "7"):
        assert f"| {patch} | 2/3 | " in summary and grouped_acc_cell(rows, patch) in summary, "over completed jobs"
    assert "4 completed, 1 failed, 1 missing" in result.stdout
    assert_png(failed / "curves.png")

    # Not a sweep: one sentence, non-zero exit.
    for path in (tmp_path / "nowhere", sweep / "0_model.patch_size=4,seed=0" / "checkpoints"):
        result = run_entry("vitlab.summarize", str(path), cwd=tmp_path, data_dir=data_dir, check=False)
        assert result.returncode == 1 and str(path) in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_group_statistics_on_hand_made_rows():
    runs = pd.DataFrame([
        {"lr": 0.1, "seed": 0, "status": "completed", "test_acc": 0.25, "best_val_acc": 0.5},
        {"lr": 0.1, "seed": 1, "status": "completed", "test_acc": 0.5, "best_val_acc": None},
        {"lr": 0.1, "seed": 2, "status": "completed", "test_acc": 0.75, "best_val_acc": 0.5},
        {"lr": 0.1, "seed": 3, "status": "failed", "test_acc": 0.99},
        {"lr": 0.02, "seed": 0, "status": "completed", "test_acc": 0.5},
        {"lr": 1.0, "seed": 0, "status": "running"},
    ])
    stats = group_stats(runs, ["lr"])
    assert list(stats["lr"]) == [0.02, 0.1, 1.0], "sorted by value"
    assert list(zip(stats["completed"], stats["jobs"])) == [(1, 1), (3, 4), (0, 1)]
    row = stats.iloc[1]
    assert (row["test_acc_mean"], row["test_acc_std"], row["test_acc_n"]) == (0.5, 0.25, 3), "failed jobs left out; n - 1"
    assert (row["best_val_acc_mean"], row["best_val_acc_std"], row["best_val_acc_n"]) == (0.5, 0.0, 2)
    assert row["wall_time_s_n"] == 0 and pd.isna(row["wall_time_s_mean"])
    assert stats.iloc[0]["test_acc_mean"] == 0.5 and pd.isna(stats.iloc[0]["test_acc_std"])
    assert fmt_stat(row, "test_acc") == "0.5000 ± 0.2500 (n=3)"
    assert fmt_stat(stats.iloc[0], "test_acc") == "0.5000 (n=1)"
    assert fmt_stat(row, "wall_time_s") == "–"
    assert list(group_stats(runs, [])["test_acc_n"]) == [4], "no key: one group of all jobs"
    mixed = group_stats(runs.assign(lr=["x", "x", 2, None, 10, "a"]), ["lr"])
    assert list(mixed["lr"][:4]) == [2, 10, "a", "x"] and pd.isna(mixed["lr"].iloc[4]), "numbers, text, missing"


def test_learning_curves_come_from_the_history_in_metrics_json(tmp_path):
    """One entry per finished epoch; a key only where it was logged; an epoch repeated by a
    resumed run counts once."""
    history = [
        {"epoch": 1, "step": 10, "train/loss": 0.9, "train/acc": 0.6, "val/loss": 0.8, "val/acc": 0.7, "train/lr": 1e-3},
        {"epoch": 2, "step": 20, "train/loss": 0.7, "train/acc": 0.7, "val/loss": 0.7, "val/acc": 0.75},
        {"epoch": 2, "step": 20, "train/loss": 0.6, "train/acc": 0.75, "val/loss": 0.6, "val/acc": 0.8},
        {"epoch": 3, "step": 30, "train/loss": 0.5},
    ]
    jobs = [tmp_path / f"{num}_seed={num}" for num in range(3)]
    for job, metrics in zip(jobs, ({"history": history}, {"history": history[:1]}, {})):
        job.mkdir()
        write_json(job / "metrics.json", {"status": "completed"} | metrics)
    assert_png(plot_run_curves(jobs[0]))
    assert plot_run_curves(jobs[1]).name == "curves.png", "a single epoch is a curve too"
    assert plot_run_curves(jobs[2]) is None and plot_run_curves(tmp_path) is None, "no history, no curves"
    runs = load_runs(jobs)
    assert list(runs["job"]) == ["0_seed=0", "1_seed=1", "2_seed=2"] and runs["history"].iloc[0] == history
    assert_png(plot_sweep_curves(runs, tmp_path))
    assert plot_sweep_curves(runs.iloc[2:], tmp_path) is None
