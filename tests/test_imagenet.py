"""The ImageNet recipe: data=imagenet reads the ILSVRC-2012 folder layout below paths.data_dir
and streams it at 224 px, experiment=imagenet_s16_90ep holds big_vision's ViT-S/16 numbers,
and both run end to end on a small generated folder of that layout, on CPU."""

import json
import math

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import run_entry, CONFIG_DIR
from imagegen import write_image

WNIDS = ("n01440764", "n01443537", "n01484850")
COLOURS = ((230, 60, 60), (40, 170, 40), (20, 20, 110))
IMAGENET_TRAIN = 1_281_167


def make_imagenet(data_dir, per_class=(6, 3)):
    """``<data_dir>/imagenet/{train,val}/<wnid>/*.JPEG``: JPEGs of mixed sizes and aspect ratios,
    and, as in the real training set, one PNG named ``.JPEG``."""
    for s, (split, count) in enumerate(zip(("train", "val"), per_class)):
        for c, (wnid, rgb) in enumerate(zip(WNIDS, COLOURS)):
            for i in range(count):
                stem = data_dir / "imagenet" / split / wnid / f"{wnid}_{i}"
                png = split == "train" and c == 0 and i == 0
                written = write_image(stem.with_suffix(".png" if png else ".jpg"), rgb, 40 + 9 * i, 70 - 6 * i,
                                      seed=1000 * s + 100 * c + i)
                written.rename(stem.with_suffix(".JPEG"))
    return data_dir


def compose_train(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture
def data_dir(tmp_path):
    return make_imagenet(tmp_path / "data")


def test_imagenet_data_streams_224_px_crops_of_the_folder(data_dir):
    cfg = compose_train("data=imagenet", f"paths.data_dir={data_dir}", "data.num_workers=0", "data.pin_memory=false",
                        "data.batch_size=8")
    assert (cfg.data.in_memory, cfg.data.image_size, cfg.data.channels) == (False, 224, 3)
    assert list(cfg.data.scale) == [0.05, 1.0] and cfg.data.crop_pct == 0.875
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.streaming and dm.class_names == list(WNIDS) and dm.num_classes == cfg.data.num_classes == 3
    assert dm.test_split == "val"
    dm.setup("fit")
    images, labels, skipped = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 224, 224) and images.dtype == torch.uint8 and not skipped
    assert 0 <= int(labels.min()) and int(labels.max()) < 3
    normalized, _ = dm.on_after_batch_transfer((images, labels, skipped), 0)
    assert -1.0 <= float(normalized.min()) and float(normalized.max()) <= 1.0  # value range (-1, 1)
    val_images, val_labels, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape == (9, 3, 224, 224) and val_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_experiment_holds_the_big_vision_recipe(data_dir):
    cfg = compose_train("experiment=imagenet_s16_90ep", f"paths.data_dir={data_dir}")
    model, opt, data, trainer = cfg.model, cfg.optimizer, cfg.data, cfg.trainer
    assert (model.patch_size, model.dim, model.depth, model.heads, model.mlp_dim) == (16, 384, 12, 6, 1536)
    assert (model.pool, model.pos_emb, model.head_init) == ("mean", "sincos2d", "zero")
    assert trainer.devices * data.batch_size == 1024 and trainer.strategy == "ddp"
    assert (trainer.max_epochs, trainer.gradient_clip_val, trainer.precision) == (90, 1.0, "bf16-mixed")
    # big_vision's decay per step is wd * schedule (1e-4 at the peak); torch's is lr * schedule * weight_decay.
    assert opt.lr == 1e-3 and opt.lr * opt.weight_decay == pytest.approx(1e-4)
    assert cfg.scheduler.warmup_steps == 10_000
    assert (data.augment.randaugment.n, data.augment.randaugment.m) == (2, 10)
    assert data.augment.randaugment.m == data.augment.randaugment.num_magnitude_bins - 1  # the top magnitude
    mix = data.augment.mixup_cutmix
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.prob) == (0.2, 0.0, 1.0)
    assert cfg.module.label_smoothing == 0.0
    assert math.isclose(data.mean[0], 0.5) and math.isclose(data.std[0], 0.5)


def test_experiment_keeps_the_data_recipe_on_shards(data_dir):
    folder = compose_train("experiment=imagenet_s16_90ep", f"paths.data_dir={data_dir}").data
    shards = compose_train("experiment=imagenet_s16_90ep", "data=shards", f"data.root={data_dir}/shards").data
    assert shards._target_.endswith("ShardsDataModule")
    shared = ("image_size", "channels", "mean", "std", "train_crop", "scale", "ratio", "hflip", "crop_pct",
              "batch_size", "eval_batch_size", "num_workers", "pin_memory", "augment")
    shards, folder = OmegaConf.to_container(shards), OmegaConf.to_container(folder)  # as written, unresolved
    assert {k: shards[k] for k in shared} == {k: folder[k] for k in shared}


def test_experiment_runs_end_to_end_on_cpu(tmp_path, data_dir):
    overrides = (
        "experiment=imagenet_s16_90ep", "debug=fast", "name=imagenet", f"paths.data_dir={data_dir}",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "compile.enabled=false",
        "trainer.enable_progress_bar=false", "data.num_workers=1", "data.pin_memory=false",
        "data.image_size=32", "data.batch_size=6", "data.eval_batch_size=9",
        "model.patch_size=8", "model.dim=32", "model.depth=2", "model.heads=2", "model.dim_head=16", "model.mlp_dim=64",
    )
    run_entry("vitlab.train", *overrides, cwd=tmp_path, data_dir=data_dir)
    metrics = json.loads((tmp_path / "outputs" / "runs" / "imagenet" / "metrics.json").read_text())
    assert metrics["status"] == "completed", metrics
    assert metrics["global_step"] == 3  # 18 training images in batches of 6
    assert 0.0 <= metrics["test/acc"] <= 1.0
