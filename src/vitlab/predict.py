"""Classify images with a checkpoint: ``python -m vitlab.predict ckpt_path=... input=<folder or image>``.

Each image (any size or mode; a folder is searched recursively) is converted to the model's
channels and size and normalised with the training statistics, as recorded in the checkpoint;
Lightning's ``trainer.predict`` runs the model. Writes ``predictions.csv`` (``file, class,
confidence``: the predicted class name and its softmax probability; with the test-time flip of
``module.test_hflip`` or ``test_hflip=true``, the mean probability of the image and its
mirror) into the predict folder (``outputs/predict/<date>/<time>/``), or to ``output=<path>``.
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from vitlab.checkpoint import model_from_checkpoint
from vitlab.config import CONFIG_PATH, check_value_types, quote_path_overrides, register_resolvers
from vitlab.data.imagefolder import ImageFilesDataModule, list_images
from vitlab.data.transforms import SampleTransform
from vitlab.errors import entry_point

log = logging.getLogger(__name__)
register_resolvers()


def predict(cfg: DictConfig) -> Path:
    if not cfg.get("ckpt_path"):
        raise ValueError("ckpt_path is not set: python -m vitlab.predict "
                         "ckpt_path=<run folder>/checkpoints/last.ckpt input=<folder or image>")
    if not cfg.get("input"):
        raise ValueError("input is not set: python -m vitlab.predict ckpt_path=... input=<folder or image>")
    check_value_types(cfg, sections=("trainer",))
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg.torch_threads)
    files = list_images(cfg.input)
    module, info = model_from_checkpoint(cfg.ckpt_path, test_hflip=cfg.get("test_hflip"),
                                         trusted=tuple(cfg.get("trusted_targets") or ()))
    model = info["model"]
    channels, size, num_classes = int(model["channels"]), int(model["image_size"]), int(model["num_classes"])
    classes = list(info.get("classes") or [])
    if len(classes) != num_classes:
        log.warning(f"{cfg.ckpt_path} records no class names: classes are written as indices")
        classes = [str(i) for i in range(num_classes)]
    data = info.get("data") or {}
    mean, std = info.get("mean") or data.get("mean"), info.get("std") or data.get("std")
    if not mean or not std:
        raise ValueError(f"ckpt_path={cfg.ckpt_path} records no normalisation statistics: "
                         f"keep it beside its run's config.yaml.")
    transform = None
    if info.get("streaming"):  # as the run evaluated: shorter side to size / crop_pct, centre crop
        transform = SampleTransform(size, train=False, crop_pct=data.get("crop_pct", 0.875),
                                    resize=data.get("resize", "crop"))
    datamodule = ImageFilesDataModule(files, image_size=size, channels=channels, mean=mean, std=std,
                                      resize=data.get("resize", "crop"), batch_size=cfg.batch_size,
                                      num_workers=cfg.num_workers, transform=transform)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_model_summary=False)
    logits = torch.cat([batch.float() for batch in trainer.predict(module, datamodule=datamodule)])
    confidence, index = logits.softmax(dim=-1).max(dim=-1)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "class", "confidence"])
        for path, k, p in zip(files, index.tolist(), confidence.tolist()):
            writer.writerow([str(path), classes[k], f"{p:.4f}"])
    log.info(f"{len(files)} images classified{' (with the test-time flip)' if module.test_hflip else ''}: {output}")
    return output


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
@entry_point
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    sys.argv = quote_path_overrides(sys.argv)
    main()
