"""What the probes of frozen features cost: the default experiment for a few epochs without and
with ``probe.every_n_epochs=1``, in interleaved rounds (each round runs both, in alternating
order, so a shared machine's drift cancels), as separate processes, start to finish.

    python scripts/bench_probe.py [--rounds 2] [--epochs 2] [--overrides trainer.precision=32-true ...]
    python scripts/bench_probe.py --parts [--rounds 5] [--steps 20] [--overrides torch_threads=1 ...]

Prints, per round: each run's wall time (the process, start to finish: start-up, training,
validation, the final test, as a user waits for it) and their ratio, with / without; and, within
the run with probes, the probes' own seconds in its last epoch (timed by the callback: the bank's
forward passes, the validation features and both classifiers) against the rest of that epoch
(the time between the probes' log lines of the last two epochs). Then the medians over the
rounds. On a shared machine, compare ratios, not seconds. Runs go to a temporary folder.

``--parts`` times the parts of an epoch in one process instead, back to back in each round:
``--steps`` training steps of the default experiment's network and optimiser (bf16 autocast
where the run would use it, batches of the real training images), the validation pass over the
5 000 validation images, and what the probes add (the bank's forward passes and both
classifiers; the validation features come with the validation pass). An epoch is the steps
scaled to the training split plus the validation pass; the ratio is (epoch + probes) / epoch,
the median over rounds. Each round's parts see the same load, so the ratio survives a busy
machine better than whole runs do; start-up and the final test are left out (the ratio of a
whole run is a little lower).
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


def parts(rounds: int, steps: int, overrides: list[str]) -> None:
    """The ``--parts`` measurement (module docstring)."""
    import hydra
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_module
    from lightning.fabric import Fabric

    from vitlab.config import CONFIG_MODULE, instantiate_model, register_resolvers
    from vitlab.probe import bank_images, extract_features, probe_scores

    register_resolvers()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=["probe.every_n_epochs=1", *overrides])
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(0)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    fabric = Fabric(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1, precision=cfg.trainer.precision)
    net = instantiate_model(cfg.model).to(fabric.device)
    optimizer = hydra.utils.instantiate(cfg.optimizer)(net.parameters())
    train, val = datamodule.train_set, datamodule.val_set
    batch, eval_batch = datamodule.batch_size, datamodule.eval_batch_size
    per_epoch = -(-len(train) // batch)
    bank, bank_labels = bank_images(datamodule, cfg.probe.bank_size, cfg.probe.seed)
    settings = {key: cfg.probe[key] for key in ("k", "temperature", "draws", "seed", "l2_reg")}
    settings["shots"] = list(cfg.probe.shots)

    def train_steps() -> None:
        net.train()
        for _ in range(steps):
            picks = torch.randint(len(train), (batch,))
            images = datamodule.normalize(train.images[picks].to(fabric.device))
            with fabric.autocast():
                loss = F.cross_entropy(net(images), train.labels[picks].to(fabric.device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def validate() -> torch.Tensor:
        net.eval()
        features = []
        with torch.inference_mode():
            for start in range(0, len(val), eval_batch):
                images = datamodule.normalize(val.images[start: start + eval_batch].to(fabric.device))
                with fabric.autocast():
                    pooled = net.features(images)
                    net.linear_head(pooled)
                features.append(pooled.float())
        return torch.cat(features)

    def probe(features: torch.Tensor) -> None:
        net.eval()
        with torch.inference_mode():
            bank_features = extract_features(net, bank, datamodule.normalize, fabric.device, eval_batch,
                                             fabric.autocast)
            probe_scores(bank_features, bank_labels, features, val.labels, datamodule.num_classes, **settings)

    def timed(work, *args):
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = work(*args)
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    train_steps(), validate()  # warm-up
    ratios, probes = [], []
    print(f"| round | {steps} training steps (s) | validation (s) | epoch, estimated (s) | probes (s) | "
          f"(epoch + probes) / epoch |\n| --- | --- | --- | --- | --- | --- |", flush=True)
    for r in range(rounds):
        t_train, _ = timed(train_steps)
        t_val, features = timed(validate)
        t_probe, _ = timed(probe, features)
        epoch = t_train / steps * per_epoch + t_val
        ratios.append((epoch + t_probe) / epoch)
        probes.append(t_probe)
        print(f"| {r + 1} | {t_train:.1f} | {t_val:.1f} | {epoch:.0f} | {t_probe:.1f} | {ratios[-1]:.3f} |", flush=True)
    print(f"probe cost: (epoch + probes) / epoch = {median(ratios):.3f}x (median of {rounds} rounds, "
          f"{min(ratios):.3f}-{max(ratios):.3f}); the probes {median(probes):.1f} s per epoch, "
          f"{torch.get_num_threads()} threads, {per_epoch} training steps of {batch} per epoch")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", action="store_true", help="time the parts of an epoch in one process")
    parser.add_argument("--rounds", type=int, default=None, help="default 2 (whole runs) or 5 (--parts)")
    parser.add_argument("--epochs", type=int, default=2, help="at least 2 (the share within a run needs two)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per round with --parts")
    parser.add_argument("--overrides", nargs="*", default=[], help="more overrides for both runs")
    args = parser.parse_args(argv)
    if args.parts:
        parts(args.rounds or 5, args.steps, args.overrides)
        return
    args.rounds = args.rounds or 2
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
