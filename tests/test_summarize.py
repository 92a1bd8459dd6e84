"""Sweep summaries: a real 2x2 multirun on Fashion-MNIST slices, then a job broken by hand."""

import csv
import json
import re
import shutil
import statistics

from conftest import SLICE, run_entry

from vitlab.plots import plot_run_curves
from vitlab.summarize import fmt_stat, group_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert float(row["test_acc"]) == metrics["test/acc"] and float(row["best_val_acc"]) == metrics["best_val_acc"]
        assert int(row["params"]) == metrics["params"] and row["epochs"] == "1"

    summary = (sweep / "summary.md").read_text()
    assert "Overrides: `model.patch_size=4,7 seed=0,1 trainer.max_epochs=2 " in summary, "the sweep's command line"
    for patch in ("4", "7"):
        assert f"| {patch} | 2/2 | " in summary and grouped_acc_cell(rows, patch).endswith("(n=2)")
        assert grouped_acc_cell(rows, patch) in summary
    assert "| 4 | 2/2 | " in result.stdout, "the grouped table is printed"

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
    metrics = json.loads((failed / "metrics.json").read_text())
    metrics.update(status="failed", error="RuntimeError: out of memory")
    (failed / "metrics.json").write_text(json.dumps(metrics))
    missing = sweep / "5_model.patch_size=4,seed=2"
    shutil.copytree(sweep / rows[1]["job"] / ".hydra", missing / ".hydra")
    set_seed(missing, 2)

    result = run_entry("vitlab.summarize", str(sweep), cwd=tmp_path, data_dir=data_dir)
    rows = read_csv(sweep / "summary.csv")
    assert [(r["job"][0], r["seed"], r["status"], r["error"]) for r in rows[4:]] == [
        ("4", "2", "failed", "RuntimeError: out of memory"),
        ("5", "2", "missing", ""),
    ]
    summary = (sweep / "summary.md").read_text()
    assert "| failed | RuntimeError: out of memory |" in summary
    for patch in ("4", "7"):
        assert f"| {patch} | 2/3 | " in summary and grouped_acc_cell(rows, patch) in summary, "over completed jobs"
    assert "4 completed, 1 failed, 1 missing" in result.stdout
    assert_png(failed / "curves.png")

    # Not a sweep: one sentence, non-zero exit.
    for path in (tmp_path / "nowhere", sweep / "0_model.patch_size=4,seed=0" / "checkpoints"):
        result = run_entry("vitlab.summarize", str(path), cwd=tmp_path, data_dir=data_dir, check=False)
        assert result.returncode == 1 and str(path) in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_group_statistics_on_hand_made_rows(tmp_path):
    rows = [
        {"lr": 0.1, "seed": 0, "status": "completed", "test_acc": 0.25, "best_val_acc": 0.5},
        {"lr": 0.1, "seed": 1, "status": "completed", "test_acc": 0.5, "best_val_acc": None},
        {"lr": 0.1, "seed": 2, "status": "completed", "test_acc": 0.75, "best_val_acc": 0.5},
        {"lr": 0.1, "seed": 3, "status": "failed", "test_acc": 0.99},
        {"lr": 0.02, "seed": 0, "status": "completed", "test_acc": 0.5},
        {"lr": 1.0, "seed": 0, "status": "running"},
    ]
    groups = group_stats(rows, ["lr"])
    assert [g["setting"] for g in groups] == [{"lr": 0.02}, {"lr": 0.1}, {"lr": 1.0}], "sorted by value"
    assert [(g["completed"], g["jobs"]) for g in groups] == [(1, 1), (3, 4), (0, 1)]
    stats = groups[1]["stats"]
    assert stats["test_acc"] == (0.5, 0.25, 3), "failed jobs left out; std with n - 1"
    assert stats["best_val_acc"] == (0.5, 0.0, 2) and stats["wall_time_s"] == (None, None, 0)
    assert groups[0]["stats"]["test_acc"] == (0.5, None, 1)
    assert fmt_stat(stats["test_acc"], "test_acc") == "0.5000 ± 0.2500 (n=3)"
    assert fmt_stat(groups[0]["stats"]["test_acc"], "test_acc") == "0.5000 (n=1)"
    assert fmt_stat(stats["wall_time_s"], "wall_time_s") == "–"
    assert group_stats(rows, [])[0]["stats"]["test_acc"][2] == 4, "no key: one group of all jobs"

    assert plot_run_curves(tmp_path) is None, "a run without event files has no curves"
