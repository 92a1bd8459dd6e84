"""What the probes of frozen features cost: the default experiment for a few epochs without and
with ``probe.every_n_epochs=1``, in interleaved rounds (each round runs both, in alternating
order, so a shared machine's drift cancels), as separate processes, start to finish.

    python scripts/bench_probe.py [--rounds 2] [--epochs 2] [--overrides trainer.precision=32-true ...]

Prints, per round: each run's wall time (the process, start to finish: start-up, training,
validation, the final test, as a user waits for it) and their ratio, with / without; and, within
the run with probes, the probes' own seconds in its last epoch (timed by the callback: the bank's
forward passes, the validation features and both classifiers) against the rest of that epoch
(the time between the probes' log lines of the last two epochs), which a busy machine's drift
between the two runs does not touch. Then the medians over the rounds. On a shared machine,
compare ratios, not seconds. Runs go to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from statistics import median

#: The callback's log line, e.g. "[2026-12-06 23:16:54,414][vitlab.probe][INFO] - probes (epoch 1, bank 10000,
#: 5000 validation images, 3.21 s): ...": when it ended, and the probes' seconds.
PROBE_LINE = re.compile(r"\[([\d-]+ [\d:]+,\d+)\]\[vitlab\.probe\]\[INFO\] - probes \(epoch \d+, bank \d+, "
                        r"\d+ validation images, ([\d.]+) s\)")


def run(folder: Path, name: str, epochs: int, probe: bool,
        overrides: list[str]) -> tuple[float, list[tuple[float, float]]]:
    """(wall seconds, [(time stamp, probes' seconds) of each epoch]) of one ``python -m vitlab.train``."""
    command = [sys.executable, "-m", "vitlab.train", f"trainer.max_epochs={epochs}", f"name={name}",
               "trainer.enable_progress_bar=false", *(["probe.every_n_epochs=1"] if probe else []), *overrides]
    env = {**os.environ, "VITLAB_OUTPUT_DIR": str(folder), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    stamps = [(datetime.strptime(when, "%Y-%m-%d %H:%M:%S,%f").timestamp(), float(seconds))
              for when, seconds in PROBE_LINE.findall(result.stdout + result.stderr)]
    return wall, stamps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="at least 2 (the share within a run needs two)")
    parser.add_argument("--overrides", nargs="*", default=[], help="more overrides for both runs")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2")
    ratios, shares = [], []
    print("| round | without probes (s) | with probes (s) | with / without | probes in the last epoch (s) | "
          "probes / rest of that epoch |\n| --- | --- | --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            walls: dict[bool, float] = {}
            for probe in ((False, True) if r % 2 == 0 else (True, False)):
                walls[probe], stamps = run(Path(tmp), f"r{r}_{'probe' if probe else 'plain'}", args.epochs, probe,
                                           args.overrides)
                if probe:
                    if len(stamps) != args.epochs:
                        raise SystemExit(f"expected {args.epochs} probe log lines, found {len(stamps)}")
                    (before, _), (end, seconds) = stamps[-2:]
                    last_probe = seconds
                    shares.append(seconds / (end - before - seconds))
            ratios.append(walls[True] / walls[False])
            print(f"| {r + 1} | {walls[False]:.1f} | {walls[True]:.1f} | {ratios[-1]:.3f} | {last_probe:.2f} | "
                  f"{100 * shares[-1]:.1f} % |", flush=True)
    print(f"probe cost: with / without = {median(ratios):.3f}x wall time (median of {args.rounds} rounds, "
          f"{min(ratios):.3f}-{max(ratios):.3f}); within the runs, the probes take {100 * median(shares):.1f} % "
          f"of an epoch's time ({100 * min(shares):.1f}-{100 * max(shares):.1f} %)")


if __name__ == "__main__":
    main()
