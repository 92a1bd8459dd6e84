"""What pruning saves an Optuna search: the same learning-rate x weight-decay search (TPE, the
sampler's seed and every job's seed fixed) run without a pruner and with one, one search after
the other, each as a user runs it (``python -m vitlab.train hparams_search=optuna ...``).

    python scripts/bench_pruning.py [--trials 16] [--epochs 3] [--pruners none median]
                                    [--overrides data.train_subset=10000 ...]

Prints, per search: its wall time (start to finish, as a user waits for it), the trials by state,
the epochs trained in all (what pruning saves, whatever the machine's load), the best best_val_acc
found, the test accuracy of that trial and its parameters. The searches go to
outputs/multirun/bench_pruning_<pruner>/ (re-running continues them: delete the folders to
measure again); the table is written to outputs/multirun/bench_pruning.md.

On a shared machine the wall times move with the load; the epochs trained do not. The first
n_startup_trials trials of TPE are drawn from the sampler's seed alone, so both searches start
from the same trials and differ from there on only through what pruning cut.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent


def search(pruner: str, trials: int, epochs: int, overrides: list[str], multirun: Path) -> dict:
    sweep = f"bench_pruning_{pruner}"
    command = [sys.executable, "-m", "vitlab.train", "hparams_search=optuna", f"sweep={sweep}",
               f"hydra.sweeper.n_trials={trials}", f"trainer.max_epochs={epochs}",
               # Learning rate and weight decay only: the other keys of the search space fixed.
               "model.depth=6", "model.patch_size=4", "trainer.enable_progress_bar=false",
               *([f"hydra.sweeper.pruner={pruner}"] if pruner != "none" else []), *overrides]
    print(" ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    folder = multirun / sweep
    results = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    jobs = [json.loads(path.read_text()) for path in sorted(folder.glob("*/metrics.json"))]
    best = max((job for job in jobs if job.get("status") == "completed"), key=lambda job: job["best_val_acc"])
    return {
        "pruner": pruner,
        "wall_min": round(seconds / 60, 1),
        "trials": ", ".join(f"{n} {state.lower()}" for state, n in results["trials"].items()),
        "epochs_trained": sum(len(job.get("history") or []) for job in jobs),
        "best_val_acc": round(100 * results["best_value"], 2),
        "its_test_acc": round(100 * best["test/acc"], 2),
        "best_params": ", ".join(f"{k.split('.')[-1]}={v:.3g}" for k, v in results["best_params"].items()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pruners", nargs="+", default=["none", "median"])
    parser.add_argument("--overrides", nargs="*", default=[])
    args = parser.parse_args()
    multirun = Path(os.environ.get("VITLAB_OUTPUT_DIR", ROOT / "outputs")) / "multirun"
    rows = [search(p, args.trials, args.epochs, args.overrides, multirun) for p in args.pruners]
    table = pd.DataFrame(rows).to_markdown(index=False)
    (multirun / "bench_pruning.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
