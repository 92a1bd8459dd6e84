"""Look inside trained models: ``python -m vitlab.analyze ckpt_path=<ckpt>`` or ``sweep=<multirun folder>``.

For one checkpoint, written into the analysis's own folder (``outputs/analyze/<date>/<time>/``,
or ``outputs/analyze/<name>/`` with ``name=``; nothing is written into the run's folder):

- ``figure7.png``: the ViT paper's Figure 7, (a) principal components of the patch-embedding
  filters, (b) position-embedding similarity, (c) mean attention distance of every head against
  depth over ``images_for_distance`` test images (``vitlab.analysis`` says exactly what each is);
- ``attention_maps.png``: for the test images ``images=`` picks (default: the first of each
  class), the last block's attention averaged over heads and the attention rollout through all
  blocks, overlaid on the image, and the norm of every output patch token;
- ``token_norms.png``: the histogram of output patch-token norms over the same test images;
- ``analysis.json``: the numbers behind the figures, and a ``summary`` of scalars.

For a sweep, every completed job's checkpoint (``checkpoint=``, default the best) is analysed
into ``<job folder name>/`` of the analysis folder, and the jobs are put side by side:
``attention_distance_by_job.png`` (mean attention distance per block, one line per job, labelled
by its swept overrides), ``summary.csv`` and ``summary.md`` (the sweep's jobs, as
``vitlab.results.load_runs(sweep, analysis=<this folder>)`` reads them: the ``summary`` scalars as
columns, and their mean ± std over seeds per setting), and ``analysis.json`` (the sweep, and
which jobs were analysed, skipped or failed, with their summaries).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from vitlab.analysis import (analyse, plot_attention_maps, plot_distance_by_job, plot_figure7, plot_token_norms,
                             require_simple_vit, summary)
from vitlab.checkpoint import model_from_checkpoint
from vitlab.config import CONFIG_PATH, quote_path_overrides, register_resolvers
from vitlab.errors import CheckpointError, entry_point
from vitlab.eval import check_shapes, data_config
from vitlab.results import ANALYSIS_FILE, group_stats, key_columns, load_runs
from vitlab.rundir import write_json

log = logging.getLogger(__name__)
register_resolvers()


class NotAnalysable(ValueError):
    """A checkpoint of a network the analysis cannot read (not vitlab's SimpleViT): one line for a
    single checkpoint; in a sweep, that job is listed as failed and the others are analysed."""


# --------------------------------------------------------------------------- the request
def image_request(value: Any) -> list[int] | None:
    """``images=`` as a list of test-set indices (null: the default pick)."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"images={value} must be test-set indices, e.g. images=[0,1,2], or null for the first test "
                         f"image of each class.")
    return [int(v) for v in values]


def positive(cfg: DictConfig, name: str) -> int:
    value = cfg.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value} must be a positive whole number, e.g. {name}="
                         f"{ {'images_for_distance': 128, 'batch_size': 64, 'pca_components': 28}.get(name, 16)}.")
    return value


def check_request(cfg: DictConfig) -> None:
    """Everything about the command line that can be checked before a file is opened."""
    if not cfg.get("ckpt_path") and not cfg.get("sweep"):
        raise ValueError("neither ckpt_path nor sweep is set: python -m vitlab.analyze "
                         "ckpt_path=<run folder>/checkpoints/<file>.ckpt, or sweep=<multirun folder>.")
    if cfg.get("ckpt_path") and cfg.get("sweep"):
        raise ValueError(f"ckpt_path={cfg.ckpt_path} and sweep={cfg.sweep} are both set: analyse one checkpoint or "
                         f"one sweep at a time (drop one of them).")
    image_request(cfg.get("images"))
    for name in ("images_for_distance", "batch_size", "pca_components", "first_classes"):
        positive(cfg, name)
    if cfg.get("query") not in ("auto", "cls", "patches"):
        raise ValueError(f"query={cfg.get('query')} is not one of auto, cls, patches.")
    if cfg.get("device") not in ("auto", "cpu") and not str(cfg.get("device")).startswith("cuda"):
        raise ValueError(f"device={cfg.get('device')} is not auto, cpu or cuda[:n].")
    if str(cfg.get("device")).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device} but this machine has no CUDA device: use device=auto or device=cpu.")


def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# --------------------------------------------------------------------------- test images
class TestImages:
    """The test split of a datamodule, read by index: straight from memory for the in-memory
    datasets, else by reading the test loader in order until the indices asked for are seen."""

    def __init__(self, datamodule):
        datamodule.prepare_data()
        datamodule.setup("test")
        self.datamodule = datamodule
        self.dataset = datamodule.test_set
        self.size = len(self.dataset)
        self.in_memory = isinstance(getattr(self.dataset, "images", None), torch.Tensor)
        labels = getattr(self.dataset, "labels", None)
        self.labels = torch.as_tensor(np.asarray(labels)) if labels is not None else None

    def check(self, indices: list[int], where: str = "images") -> None:
        bad = [i for i in indices if not 0 <= i < self.size]
        if bad:
            raise ValueError(f"{where}={indices} names test image{'s' if len(bad) > 1 else ''} {bad[:5]} but the test "
                             f"split has {self.size} images: choose indices from 0 to {self.size - 1}.")

    def first_of_each_class(self, num_classes: int, limit: int) -> list[int]:
        """The first test image of each of the first ``limit`` classes (in class order)."""
        classes = range(min(num_classes, limit))
        if self.labels is not None:
            found = {int(c): int(hits[0]) for c in classes if len(hits := (self.labels == c).nonzero().flatten())}
        else:
            found = {}
            for offset, (_, labels) in self._batches():
                for i, label in enumerate(labels.tolist()):
                    if label in classes:
                        found.setdefault(label, offset + i)
                if len(found) == len(classes):
                    break
        return [found[c] for c in classes if c in found]

    def _batches(self) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
        offset = 0
        for batch in self.datamodule.test_dataloader():
            images, labels = self.datamodule.on_after_batch_transfer(batch, 0)[:2]
            yield offset, (images, labels)
            offset += len(images)

    def take(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised images, labels) of the test images at ``indices``."""
        if self.in_memory:
            index = torch.as_tensor(indices, dtype=torch.long)
            return self.datamodule.normalize(self.dataset.images[index]), self.dataset.labels[index]
        wanted, found = set(indices), {}
        for offset, (images, labels) in self._batches():
            for i in range(len(images)):
                if offset + i in wanted:
                    found[offset + i] = (images[i], labels[i])
            if len(found) == len(wanted):
                break
        return torch.stack([found[i][0] for i in indices]), torch.stack([found[i][1] for i in indices])

    def first(self, count: int, batch_size: int) -> Iterator[torch.Tensor]:
        """The first ``count`` test images, normalised, in batches."""
        if self.in_memory:
            for start in range(0, count, batch_size):
                yield self.datamodule.normalize(self.dataset.images[start: min(start + batch_size, count)])
            return
        for offset, (images, _) in self._batches():
            if offset >= count:
                return
            yield images[: count - offset]

    def pixels(self, images: torch.Tensor) -> np.ndarray:
        """Normalised images back to [0, 1] pixels, for display."""
        mean, std = self.datamodule.mean.to(images.device), self.datamodule.std.to(images.device)
        return (images * std + mean).clamp(0, 1).cpu().numpy()


# --------------------------------------------------------------------------- one checkpoint
def run_folder(ckpt: Path) -> Path | None:
    """The run folder a checkpoint sits in (``<run>/checkpoints/<file>.ckpt``), if it is one."""
    folder = ckpt.resolve().parent
    return folder.parent if folder.name == "checkpoints" else None


def analyse_checkpoint(cfg: DictConfig, ckpt: str | Path, out: Path, data_cache: dict, title: str = "") -> dict:
    """Analyse one checkpoint into ``out``; returns what ``analysis.json`` holds."""
    ckpt = Path(str(ckpt)).expanduser()
    module, info = model_from_checkpoint(ckpt)  # one-line errors for anything that is not a vitlab checkpoint
    net = module.net
    try:
        require_simple_vit(net, f"the model of ckpt_path={ckpt}")
    except ValueError as error:
        raise NotAnalysable(str(error)) from None
    device = pick_device(cfg.device)
    net = net.float().to(device).eval()

    job_cfg = OmegaConf.merge(cfg, {"ckpt_path": str(ckpt)})
    data = data_config(job_cfg, info)
    key = json.dumps(data, sort_keys=True, default=str)
    if key not in data_cache:  # the jobs of a sweep mostly share their test set: read it once
        data_cache[key] = TestImages(hydra.utils.instantiate(data))
    test = data_cache[key]
    check_shapes(test.datamodule, info["model"])
    classes = list(info.get("classes") or getattr(test.datamodule, "class_names", None) or [])
    num_classes = int(info["model"]["num_classes"])
    if len(classes) != num_classes:
        classes = [str(i) for i in range(num_classes)]

    requested = image_request(cfg.get("images"))
    indices = requested if requested is not None else test.first_of_each_class(num_classes, cfg.first_classes)
    test.check(indices)
    if not indices:
        raise ValueError("images picks no test image: name some, e.g. images=[0,1,2].")
    count = min(cfg.images_for_distance, test.size)

    picked, labels = test.take(indices)
    result = analyse(net, lambda: test.first(count, cfg.batch_size), picked, components=cfg.pca_components,
                     query=cfg.query)
    predicted = result["attention_maps"]["predicted"]
    names = [f"#{i} {classes[int(t)]}\n→ {classes[int(p)]}" for i, t, p in zip(indices, labels.tolist(), predicted)]

    out.mkdir(parents=True, exist_ok=True)
    heading = title or str(ckpt)
    figures = [plot_figure7(result, out / "figure7.png", heading).name,
               plot_attention_maps(result, test.pixels(picked), names, out / "attention_maps.png").name,
               plot_token_norms(result["_all_norms"], result["token_norms"], result["model"]["register_tokens"],
                                out / "token_norms.png").name]
    run = run_folder(ckpt)
    payload = {
        "status": "completed",
        "ckpt_path": str(ckpt.resolve()),
        "run_dir": str(run) if run else None,
        "data": data.get("_target_"),
        "images": indices,
        "labels": [int(t) for t in labels.tolist()],
        "classes": classes,
        "figures": figures,
        "summary": summary(result),
        **{k: v for k, v in result.items() if not k.startswith("_")},
    }
    payload["attention_maps"]["predicted_class"] = [classes[int(p)] for p in predicted]
    write_json(out / ANALYSIS_FILE, payload)
    s = payload["summary"]
    log.info(f"{heading}: mean attention distance {s['mean_attention_distance']:.2f} px (blocks "
             f"{', '.join(f'{d:.1f}' for d in s['attention_distance_per_block'])}; uniform "
             f"{result['attention_distance']['uniform_attention']:.2f}), token norms max/median "
             f"{s['token_norm_max_over_median']:.2f}; {', '.join(figures)} and {ANALYSIS_FILE} in {out}")
    return payload


# --------------------------------------------------------------------------- a sweep
def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value).replace("|", "\\|")


def write_sweep_summary(sweep_dir: Path, out: Path) -> pd.DataFrame:
    """``summary.csv`` and ``summary.md`` in ``out``: the sweep's jobs with the analysis columns,
    and the mean ± sample std over seeds of each setting."""
    runs = load_runs(sweep_dir, analysis=out)
    keys = key_columns(runs)
    analysis_columns = [c for c in ANALYSIS_COLUMNS if c in runs.columns]
    table = runs[["job", *keys, "status", "test_acc", *analysis_columns]]
    table.to_csv(out / "summary.csv", index=False)
    scalars = [c for c in analysis_columns if c != "attention_distance_per_block"]
    group_keys = [k for k in keys if k != "seed"]
    stats = group_stats(runs, group_keys, ["test_acc", *scalars])
    grouped = stats[group_keys].astype(object).map(_cell) if group_keys else pd.DataFrame(index=stats.index)
    grouped["jobs"] = stats["jobs"].astype(str)
    for metric in ["test_acc", *scalars]:
        grouped[metric] = [f"{_cell(r[f'{metric}_mean'])} ± {r[f'{metric}_std']:.2g} (n={int(r[f'{metric}_n'])})"
                           if r[f"{metric}_n"] > 1 else _cell(r[f"{metric}_mean"]) for _, r in stats.iterrows()]
    md = [f"# Analysis of the sweep {sweep_dir}",
          "Columns of `analysis.json`'s `summary` per job (mean attention distance in pixels; "
          "`token_norm_max_over_median`: largest output patch-token norm over the median).",
          "## Mean ± sample std over seeds",
          grouped.to_markdown(index=False, disable_numparse=True),
          "## Jobs",
          table.astype(object).map(_cell).to_markdown(index=False, disable_numparse=True),
          "![attention distance by job](attention_distance_by_job.png)"]
    (out / "summary.md").write_text("\n\n".join(md) + "\n")
    return runs


#: The ``summary`` fields of an analysis that the sweep's summary shows.
ANALYSIS_COLUMNS = ("mean_attention_distance", "attention_distance_first_block", "attention_distance_last_block",
                    "attention_distance_per_block", "attention_to_non_patch_tokens", "token_norm_max_over_median",
                    "patch_embedding_top_pc_share")


def analyse_sweep(cfg: DictConfig, out: Path) -> dict:
    sweep_dir = Path(str(cfg.sweep)).expanduser()
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep={sweep_dir} is not a folder: pass a multirun folder, e.g. "
                                f"sweep=outputs/multirun/<name>.")
    runs = load_runs(sweep_dir)
    if runs.empty:
        raise ValueError(f"sweep={sweep_dir} has no job folders (subfolders with metrics.json or .hydra/): pass the "
                         f"folder of a multirun, e.g. sweep=outputs/multirun/<name>.")
    keys = key_columns(runs)
    keys = [*[k for k in keys if k != "seed"], *[k for k in keys if k == "seed"]]  # a job's label ends in its seed
    setting_keys = [k for k in keys if k != "seed"]
    data_cache: dict = {}
    analysed, skipped, failed, curves, groups, uniform = {}, {}, {}, {}, {}, {}
    for _, row in runs.iterrows():
        job, folder = row["job"], Path(row["dir"])
        found = sorted((folder / "checkpoints").glob(cfg.checkpoint))
        if row["status"] != "completed":
            skipped[job] = f"status {row['status']}"
            continue
        if not found:
            skipped[job] = f"no checkpoints/{cfg.checkpoint}"
            continue
        label = ", ".join(f"{k}={row[k]}" for k in keys) or job
        try:
            payload = analyse_checkpoint(cfg, found[-1], out / job, data_cache, title=f"{sweep_dir.name}: {label}")
        except (CheckpointError, NotAnalysable) as error:  # that job's checkpoint: the others go on
            failed[job] = str(error)
            log.warning(f"{job}: not analysed: {error}")
            continue
        analysed[job] = {"label": label, "ckpt_path": payload["ckpt_path"], **payload["summary"]}
        curves[label] = payload["summary"]["attention_distance_per_block"]
        groups[label] = ", ".join(f"{k}={row[k]}" for k in setting_keys) or label
        uniform[label] = payload["attention_distance"]["uniform_attention"]
    for job, why in skipped.items():
        log.info(f"{job}: skipped ({why})")
    if not analysed:
        reasons = "; ".join(f"{job}: {why}" for job, why in {**skipped, **failed}.items())
        raise ValueError(f"sweep={sweep_dir} has no completed job with a checkpoints/{cfg.checkpoint} to analyse "
                         f"({len(runs)} jobs: {reasons[:300]}).")
    figures = [plot_distance_by_job(curves, groups, out / "attention_distance_by_job.png", uniform).name]
    write_sweep_summary(sweep_dir, out)
    payload = {"status": "completed", "sweep": str(sweep_dir.resolve()), "checkpoint": cfg.checkpoint,
               "keys": keys, "jobs": analysed, "skipped": skipped, "failed": failed,
               "figures": [*figures, "summary.csv", "summary.md"]}
    write_json(out / ANALYSIS_FILE, payload)
    log.info(f"{len(analysed)} of {len(runs)} jobs of {sweep_dir} analysed ({len(skipped)} skipped, {len(failed)} "
             f"failed): one folder per job, attention_distance_by_job.png, summary.csv/.md in {out}")
    return payload


# --------------------------------------------------------------------------- entry point
def analyze(cfg: DictConfig) -> dict:
    check_request(cfg)
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg.torch_threads)
    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("sweep"):
        return analyse_sweep(cfg, out)
    return analyse_checkpoint(cfg, cfg.ckpt_path, out, {})


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="analyze")
@entry_point
def _task(cfg: DictConfig) -> None:
    analyze(cfg)


def quote_sweep(argv: list[str]) -> list[str]:
    """``sweep=<folder>`` is a path like ``ckpt_path``: quoted the same way, so a folder name with
    ``=`` or ``,`` passes as it is."""
    quoted = []
    for arg in argv:
        if arg.startswith("sweep="):
            arg = "sweep=" + quote_path_overrides(["ckpt_path=" + arg[len("sweep="):]])[0][len("ckpt_path="):]
        quoted.append(arg)
    return quoted


def main() -> None:
    """``python -m vitlab.analyze``: the paths of ``ckpt_path=`` and ``sweep=`` (sweep job folders are
    named ``<n>_<key>=<value>,...``) are quoted for Hydra's override grammar, then the task runs."""
    sys.argv = quote_sweep(quote_path_overrides(sys.argv))
    _task()


if __name__ == "__main__":
    main()
