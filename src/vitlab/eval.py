"""Evaluate a checkpoint on a dataset's test split: ``python -m vitlab.eval ckpt_path=... [data=...]``.

The model is the one the checkpoint was trained as (its run description, or the run's
``config.yaml`` beside ``checkpoints/``); the data is the run's own dataset unless ``data=``
names another, always normalised with the training statistics. The checkpoint is read once,
safely (``vitlab.checkpoint``); Lightning's ``trainer.test`` computes ``test/acc`` and
``test/loss``, and a callback collects the confusion matrix. Written to the eval's own folder
(``outputs/eval/<date>/<time>/``): ``metrics.json``, ``confusion_matrix.csv`` and ``.png``,
``per_class_accuracy.csv``; a run tracked in MLflow gets these under its ``eval/`` artifacts.

``probe=true`` also runs the probes of the frozen features (``vitlab.probe``: kNN and few-shot
linear classifiers fitted on the training split of the data, scored on its validation split),
on any dataset whose images the model reads: ``data=mnist`` on a Fashion-MNIST model measures
how its features transfer. A dataset with another number of classes than the model's head is
probed only (the test, which needs the head, is skipped).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import pandas as pd
from matplotlib.figure import Figure
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torchmetrics.classification import MulticlassConfusionMatrix

from vitlab import tracking
from vitlab.checkpoint import check_targets, model_from_checkpoint, trusted_prefixes
from vitlab.config import CONFIG_PATH, check_value_types, quote_path_overrides, register_resolvers
from vitlab.errors import entry_point
from vitlab.probe import eval_probe, probe_network
from vitlab.rundir import METRICS_FILE, write_json

log = logging.getLogger(__name__)
register_resolvers()


class ConfusionMatrix(L.Callback):
    """Confusion matrix of the test run (rows: true class, columns: predicted), from the logits
    each test step scored (its output), so it counts exactly what ``test/acc`` counts."""

    def __init__(self, num_classes: int):
        self.metric = MulticlassConfusionMatrix(num_classes=num_classes)
        self.matrix: torch.Tensor | None = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metric = self.metric.to(pl_module.device)
        self.metric.reset()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.metric.update(outputs.float(), batch[1])

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.matrix = self.metric.compute().cpu()


def data_config(cfg: DictConfig, info: dict[str, Any]) -> dict[str, Any]:
    """The dataset to evaluate on: ``data=<name>`` if given, else the run's own (with this
    machine's ``paths.data_dir`` and any ``+data.<field>=`` changes); training augmentation
    off; normalised as in training."""
    given = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else {}
    if "_target_" in given:
        data = given
    elif isinstance(info.get("data"), dict):
        data = dict(info["data"])
        check_targets(data, f"ckpt_path={cfg.ckpt_path}: data", trusted_prefixes(cfg.get("trusted_targets")))
        if "data_dir" in data:
            data["data_dir"] = cfg.paths.data_dir
        data.update(given)
    else:
        raise ValueError(f"ckpt_path={cfg.ckpt_path} does not say which dataset it was trained on: pass data=<name>.")
    if "augment" in data:
        data["augment"] = None
    if "in_memory" in data and "in_memory" not in given and "streaming" in info:
        data["in_memory"] = not info["streaming"]  # evaluate as the run was evaluated
    if info.get("mean") is not None and "mean" in data and len(info["mean"]) == data.get("channels"):
        data["mean"], data["std"] = info["mean"], info["std"]
    return data


def check_shapes(datamodule, model_cfg: dict[str, Any], probe: bool = False) -> bool:
    """Refuse data the model cannot read; returns whether its classes are the head's (with
    ``probe``, other classes are allowed: only the probes run)."""
    want = (model_cfg.get("image_size"), model_cfg.get("channels"), model_cfg.get("num_classes"))
    have = (datamodule.image_size, datamodule.channels, datamodule.num_classes)
    if probe and want[:2] == have[:2]:
        return want[2] == have[2]
    if want != have:
        raise ValueError(
            f"the checkpoint's model takes {want[1]}-channel {want[0]}x{want[0]} images in {want[2]} classes, "
            f"but the data gives {have[1]}-channel {have[0]}x{have[0]} images in {have[2]} classes: "
            f"choose data= (and data.image_size=, data.channels=) to match."
        )
    return True


def write_reports(out: Path, confusion: ConfusionMatrix, classes: list[str]) -> pd.DataFrame:
    """``confusion_matrix.csv`` (rows: true class, columns: predicted), ``.png`` (torchmetrics'
    plot, with counts) and ``per_class_accuracy.csv`` of the matrix the test computed (on every
    rank, at its end); returns the per-class table."""
    matrix = confusion.matrix
    pd.DataFrame(matrix.numpy(), index=pd.Index(classes, name="true \\ predicted"), columns=classes).to_csv(
        out / "confusion_matrix.csv")
    counts = matrix.sum(dim=1)
    per_class = pd.DataFrame({"class": classes, "accuracy": (matrix.diag() / counts).numpy().round(6),
                              "correct": matrix.diag().numpy(), "count": counts.numpy()})
    per_class.to_csv(out / "per_class_accuracy.csv", index=False)
    side = max(4.0, 0.45 * len(classes) + 2)
    fig = Figure(figsize=(side + 1, side))  # no pyplot: nothing global is left behind
    ax = fig.add_subplot()
    confusion.metric.plot(matrix, ax=ax, labels=classes if len(classes) <= 30 else None, add_text=len(classes) <= 30)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"accuracy {matrix.diag().sum().item() / max(1, matrix.sum().item()):.4f}")
    fig.savefig(out / "confusion_matrix.png", dpi=120, bbox_inches="tight")
    return per_class


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.get("ckpt_path"):
        raise ValueError("ckpt_path is not set: python -m vitlab.eval ckpt_path=<run folder>/checkpoints/last.ckpt")
    check_value_types(cfg, sections=("trainer", "data"))
    if not isinstance(cfg.get("probe", False), bool):
        raise ValueError(f"probe={cfg.probe!r} must be true (also run the probes of the frozen features) or false.")
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg.torch_threads)
    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed)
    patch_sizes = cfg.get("patch_sizes")
    module, info = model_from_checkpoint(cfg.ckpt_path, test_hflip=cfg.get("test_hflip"),
                                         test_image_sizes=list(cfg.get("image_sizes") or ()),
                                         test_patch_sizes=list(patch_sizes) if patch_sizes is not None else None,
                                         positions=cfg.get("positions"),
                                         trusted=tuple(cfg.get("trusted_targets") or ()))
    # Settings and the network's pooled features checked before anything runs.
    probe = eval_probe(module.net, cfg.probe_settings) if cfg.get("probe") else None
    data = data_config(cfg, info)
    datamodule = hydra.utils.instantiate(data)
    same_classes = check_shapes(datamodule, info["model"], probe=probe is not None)
    metrics: dict[str, Any] = {
        "status": "completed",
        "ckpt_path": str(Path(cfg.ckpt_path).expanduser().resolve()),
        "data": data.get("_target_"),
    }
    confusion = ConfusionMatrix(datamodule.num_classes)
    trainer = None
    if same_classes:
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[confusion], enable_checkpointing=False,
                                          enable_model_summary=False)
        results = trainer.test(module, datamodule=datamodule)[0]
        metrics.update({"test_hflip": module.test_hflip, "test_split_size": int(confusion.matrix.sum()),
                        **{key: float(value) for key, value in results.items()}})
        if cfg.get("image_sizes") and hasattr(module.net, "positions"):
            metrics["positions"] = module.net.positions  # where the other sizes' patches lay
    else:
        log.info(f"the data has {datamodule.num_classes} classes and the model's head "
                 f"{info['model'].get('num_classes')}: probes only, no test")
        metrics["test_skipped"] = "the data's classes are not the model's"
    if probe is not None:
        prober = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[probe], enable_checkpointing=False,
                                         enable_model_summary=False)
        metrics.update(probe_network(module.net, datamodule, prober, probe))
        metrics["probe_settings"] = {"split": "val", **probe.counts, "k": probe.k, "temperature": probe.temperature,
                                     "shots": probe.shots, "draws": probe.draws, "l2_reg": probe.l2_reg,
                                     "seed": probe.seed}
        trainer = trainer or prober
    if trainer.is_global_zero:
        written = "metrics.json"
        if same_classes:
            per_class = write_reports(out, confusion, list(datamodule.class_names))
            rows = per_class[["class", "accuracy", "count"]].values
            metrics["per_class_accuracy"] = {c: float(a) if n else None for c, a, n in rows}
            written += ", confusion_matrix.csv/.png and per_class_accuracy.csv"
        write_json(out / METRICS_FILE, metrics)
        tracking.eval_ended(info.get("tracking"), out)
        if same_classes:
            variants = "".join(f", {key} {value:.4f}" for key, value in metrics.items() if key.startswith("test/acc@"))
            log.info(f"test/acc {metrics.get('test/acc', float('nan')):.4f}{variants} on {metrics['test_split_size']} "
                     f"images")
        if probe is not None:
            log.info("probes: " + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()
                                            if key.startswith("probe/")))
        log.info(f"{written} in {out}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
@entry_point
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    sys.argv = quote_path_overrides(sys.argv)
    main()
