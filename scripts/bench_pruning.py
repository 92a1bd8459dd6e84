"""What pruning saves an Optuna search: the same learning-rate x weight-decay search (TPE, the
sampler's seed and every job's seed fixed) run without a pruner and with one, one search after
the other, each as a user runs it (``python -m vitlab.train hparams_search=optuna ...``).

    python scripts/bench_pruning.py [--trials 16] [--epochs 3] [--pruners none median]
                                    [--overrides shape=d4_w96 model.depth=4 data.train_subset=5000 ...]

The searched keys are optimizer.lr and optimizer.weight_decay (conf/hparams_search/optuna.yaml's
ranges); the network is fixed by ``--overrides``, by default the ablations' SimpleViT (width 96,
depth 4, patch 4) on a class-balanced 5 000 of the training images (validation and test whole), so
that 2 x 16 trials fit in about an hour of a busy 2-core CPU. ``--overrides model.depth=6`` (the
default model) and no subset is the full-scale search.

Prints, per search: its wall time (from its first trial's start to its last trial's end, as the
study records them, so a search stopped and continued counts only its trials' time), the trials by state,
the epochs trained in all (what pruning saves, whatever the machine's load), the best best_val_acc
found, the test accuracy of that trial and its parameters. The searches go to
outputs/multirun/bench_pruning_<pruner>/ (re-running continues them: delete the folders to
measure again); the table is written to outputs/multirun/bench_pruning.md.

``--side-by-side`` runs the searches at the same time, so that both see the same load (the one
that ends first leaves the machine to the other, which flatters the slower search). On a shared
machine the wall times move with the load; the epochs trained do not. The first
n_startup_trials trials of TPE are drawn from the sampler's seed alone, so both searches start
from the same trials and differ from there on only through what pruning cut.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent


def command(pruner: str, trials: int, epochs: int, overrides: list[str]) -> list[str]:
    """The search as a user types it; its folder is outputs/multirun/bench_pruning_<pruner>/."""
    return [sys.executable, "-m", "vitlab.train", "hparams_search=optuna", f"sweep=bench_pruning_{pruner}",
            f"hydra.sweeper.n_trials={trials}", f"trainer.max_epochs={epochs}",
            # Learning rate and weight decay only: the other keys of the search space fixed.
            "model.patch_size=4", "trainer.enable_progress_bar=false",
            *([f"hydra.sweeper.pruner={pruner}"] if pruner != "none" else []), *overrides]


def result(pruner: str, multirun: Path) -> dict:
    import optuna

    folder = multirun / f"bench_pruning_{pruner}"
    study = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'optuna.db'}")
    seconds = (max(t.datetime_complete for t in study.trials)
               - min(t.datetime_start for t in study.trials)).total_seconds()
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
    parser.add_argument("--overrides", nargs="*", default=["shape=d4_w96", "model.depth=4", "data.train_subset=5000"])
    parser.add_argument("--side-by-side", action="store_true", help="run the searches at the same time")
    args = parser.parse_args()
    multirun = Path(os.environ.get("VITLAB_OUTPUT_DIR", ROOT / "outputs")) / "multirun"
    commands = [command(p, args.trials, args.epochs, args.overrides) for p in args.pruners]
    running = []
    for line in commands:
        print(" ".join(line[1:]), flush=True)
        running.append(subprocess.Popen(line, cwd=ROOT, stdout=subprocess.DEVNULL))
        if not args.side_by_side:
            running[-1].wait()
    if any(process.wait() for process in running):
        sys.exit("a search failed: see its folder's logs")
    rows = [result(p, multirun) for p in args.pruners]
    table = pd.DataFrame(rows).to_markdown(index=False)
    (multirun / "bench_pruning.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
