"""Every config of every group composes, and the objects it names can be built."""

from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from conftest import CONFIG_DIR
from vitlab.config import instantiate_model
from imagegen import make_image_folder

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra" and p.name[0] != "_")


def options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_train(*overrides, tmp: Path | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as in a run: ${hydra:...} resolves
    # Outside a real run there is no hydra:runtime.output_dir; stand one in.
    cfg.paths.output_dir = str(tmp or "/tmp/vitlab-compose")
    return cfg


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes(group, option, tmp_path):
    cfg = compose_train(f"{group}={option}", tmp=tmp_path)
    with open_dict(cfg):
        del cfg["hydra"]  # job-time fields (job.num, ...) exist only inside a run
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["model"]["image_size"] == container["data"]["image_size"]


@pytest.mark.parametrize("data", options("data"))
def test_model_and_datamodule_instantiate(data, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_DATA_DIR", str(data_dir))
    # data=imagefolder reads the user's own folder: a generated one here.
    extra = []
    if data in ("imagefolder", "imagenet", "shards"):
        root = make_image_folder(tmp_path / "photos", per_class=1)
        if data == "shards":  # shards written from the folder, as vitlab.prepare does
            from vitlab.data.imagefolder import ImageFolderDataModule
            from vitlab.data.shards import write_shards

            root = write_shards(ImageFolderDataModule(root=str(root), image_size=16), tmp_path / "shards",
                                num_workers=1) and tmp_path / "shards"
        extra = [f"data.root={root}"]
    cfg = compose_train(f"data={data}", *extra, tmp=tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    net = instantiate_model(cfg.model)
    assert (dm.image_size, dm.channels, dm.num_classes) == (cfg.model.image_size, cfg.model.channels, cfg.model.num_classes)
    module = hydra.utils.instantiate(cfg.module, net=net, optimizer=hydra.utils.instantiate(cfg.optimizer),
                                     scheduler=hydra.utils.instantiate(cfg.scheduler))
    assert module.net is net


def test_trainer_and_callbacks_instantiate(tmp_path):
    from vitlab.config import instantiate_dict

    cfg = compose_train(tmp=tmp_path)
    callbacks = instantiate_dict(cfg.callbacks)
    loggers = instantiate_dict(cfg.logger)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert trainer.checkpoint_callback.monitor == "val/acc"
    assert trainer.precision in ("bf16-mixed", "32-true")


def test_run_and_sweep_folders(tmp_path):
    cfg = compose_train(tmp=tmp_path)
    assert "/runs/" in cfg.hydra.run.dir
    assert "/multirun/" in cfg.hydra.sweep.dir
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert sweep["subdir"] == "${hydra.job.num}_${vitlab.job_dirname:${hydra.overrides.task}}"


def test_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VITLAB_DATA_DIR", "/somewhere/else")
    assert compose_train(tmp=tmp_path).data.data_dir == "/somewhere/else"
    monkeypatch.delenv("VITLAB_DATA_DIR")
    assert compose_train(tmp=tmp_path).data.data_dir == "data"


@pytest.mark.parametrize("path", [
    "outputs/multirun/ablation_pool/3_model.pool=cls,optimizer.lr=0.002,seed=0/checkpoints/last.ckpt",
    "/data/my photos/run (2)/[best]/it's.ckpt",
    "C:\\runs\\a=b\\last.ckpt",
])
def test_paths_out_of_sweeps_are_passed_through_hydra_unchanged(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from vitlab.config import quote_path_overrides

    argv = quote_path_overrides(["prog", f"ckpt_path={path}", "+data.root=" + path, "seed=1"])
    parsed = OverridesParser.create().parse_overrides(argv[1:])
    assert [o.value() for o in parsed] == [path, path, 1]


def test_path_quoting_leaves_multiruns_and_plain_values_alone():
    from vitlab.config import quote_path_overrides

    assert quote_path_overrides(["prog", "-m", "ckpt_path=a.ckpt,b.ckpt"]) == ["prog", "-m", "ckpt_path=a.ckpt,b.ckpt"]
    assert quote_path_overrides(["prog", "ckpt_path=runs/x/last.ckpt", "model.dim=3,4"]) == [
        "prog", "ckpt_path=runs/x/last.ckpt", "model.dim=3,4"]
