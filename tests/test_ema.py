"""callbacks=ema: validation, checkpoints and the test use the averaged weights; resuming from
last.ckpt continues both the raw weights and the average."""

import json

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONFIG_DIR, SLICE, run_entry
from vitlab.callbacks import EMA
from vitlab.config import instantiate_dict, instantiate_model

# A tiny model on synthetic 28 px images; decay 0.5 so that the average is far from the weights.
OVERRIDES = (*SLICE, "callbacks=ema", "callbacks.ema.decay=0.5", "logger=none", "data=synthetic", "data.image_size=28",
             "data.channels=1", "data.train_size=512", "data.val_size=256", "data.test_size=256", "torch_threads=1")


def flat(state) -> torch.Tensor:
    """The network's weights as one vector, from a module or a checkpoint's state dict."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    return torch.cat([v.detach().flatten().float().clone() for k, v in state.items() if k.startswith("net.")])


class Recorder(L.Callback):
    """Listed after the EMA callback, so it sees the model as EMA leaves it at each hook."""

    def __init__(self, mid_validation_checkpoint=None):
        self.raw = None  # weights after the latest optimizer step
        self.validations = []  # (global step, weights validated, raw weights at that time)
        self.first_train_batch = None
        self.first_average = None  # the EMA callback's average at the first training batch
        self.tested = None
        self.mid_validation_checkpoint = mid_validation_checkpoint
        self.mid_validation = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_train_batch is None:
            self.first_train_batch = flat(pl_module)
            average = next(c for c in trainer.callbacks if isinstance(c, EMA))._average_model
            self.first_average = (flat(average.module), int(average.n_averaged))
        elif self.validations and self.raw is not None:
            # Back to the raw weights after each validation.
            assert torch.equal(flat(pl_module), self.raw)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw = flat(pl_module)

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.validations.append((trainer.global_step, flat(pl_module), self.raw))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        # A checkpoint saved mid-validation, as CheckpointOnSigterm does on a SIGTERM there.
        if self.mid_validation_checkpoint and trainer.current_epoch == 1 and batch_idx == 0 and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.mid_validation_checkpoint)
            self.mid_validation = (flat(pl_module), self.raw)

    def on_test_epoch_start(self, trainer, pl_module):
        self.tested = flat(pl_module)


def compose_cfg(tmp_path, *extra):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[*OVERRIDES, f"paths.output_dir={tmp_path}", *extra])


def build(cfg, recorder):
    torch.set_num_threads(1)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module, net=instantiate_model(cfg.model),
                                     optimizer=hydra.utils.instantiate(cfg.optimizer),
                                     scheduler=hydra.utils.instantiate(cfg.scheduler))
    callbacks = instantiate_dict(cfg.callbacks)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[*callbacks, recorder], logger=False)
    ema = next(c for c in callbacks if isinstance(c, EMA))
    return datamodule, module, trainer, ema


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema")
    cfg = compose_cfg(out)
    recorder = Recorder(mid_validation_checkpoint=out / "mid_validation.ckpt")
    datamodule, module, trainer, ema = build(cfg, recorder)
    trainer.fit(module, datamodule=datamodule)
    return dict(out=out, cfg=cfg, recorder=recorder, datamodule=datamodule, module=module, trainer=trainer, ema=ema,
                val_loss=float(trainer.callback_metrics["val/loss"]))


def test_ema_config_builds_the_callback_with_its_decay(tmp_path):
    callbacks = instantiate_dict(compose_cfg(tmp_path, "callbacks.ema.decay=0.99").callbacks)
    ema = [c for c in callbacks if isinstance(c, EMA)]
    assert len(ema) == 1 and ema[0].decay == 0.99
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        default = compose("train", overrides=[f"paths.output_dir={tmp_path}"]).callbacks
    # The default callbacks, plus the EMA.
    assert [type(c) for c in callbacks if not isinstance(c, EMA)] == [type(c) for c in instantiate_dict(default)]


@pytest.mark.parametrize("decay", [1.0, -0.1, True])
def test_invalid_decay_names_value_and_fix(decay):
    with pytest.raises(ValueError, match=rf"callbacks.ema.decay={decay!r} is not in \[0, 1\): .* use e.g. 0.999"):
        EMA(decay=decay)


def test_validation_runs_on_the_average(fitted):
    recorder = fitted["recorder"]
    assert [step for step, _, _ in recorder.validations] == [8, 16]
    for step, validated, raw in recorder.validations:
        assert not torch.allclose(validated, raw), f"step {step}: validated the raw weights"
    # Fitting ends with the average in the model: the weights of the last validation.
    assert torch.equal(flat(fitted["module"]), recorder.validations[-1][1])
    # The logged val/loss is that of the average, and not that of the raw weights.
    trainer, module, datamodule = fitted["trainer"], fitted["module"], fitted["datamodule"]
    assert trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"] == pytest.approx(fitted["val_loss"], abs=1e-6)
    raw_state = torch.load(fitted["out"] / "checkpoints" / "last.ckpt", weights_only=False)["current_model_state"]
    raw_module = hydra.utils.instantiate(fitted["cfg"].module, net=instantiate_model(fitted["cfg"].model),
                                         optimizer=hydra.utils.instantiate(fitted["cfg"].optimizer))
    raw_module.load_state_dict(raw_state)
    raw_loss = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                         precision=trainer.precision).validate(raw_module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    assert abs(raw_loss - fitted["val_loss"]) > 1e-4


def test_checkpoints_hold_the_average_and_the_raw_weights(fitted):
    recorder, checkpoints = fitted["recorder"], fitted["out"] / "checkpoints"
    by_step = {step: (validated, raw) for step, validated, raw in recorder.validations}
    for path in [fitted["trainer"].checkpoint_callback.best_model_path, checkpoints / "last.ckpt"]:
        ckpt = torch.load(path, weights_only=False)
        validated, raw = by_step[ckpt["global_step"]]
        assert torch.equal(flat(ckpt["state_dict"]), validated), path
        assert torch.equal(flat(ckpt["current_model_state"]), raw), path
    # Saved during validation, when the model holds the average: the roles stay right.
    ckpt = torch.load(fitted["out"] / "mid_validation.ckpt", weights_only=False)
    average, raw = recorder.mid_validation
    assert not torch.allclose(average, raw)
    assert torch.equal(flat(ckpt["state_dict"]), average)
    assert torch.equal(flat(ckpt["current_model_state"]), raw)


def test_testing_the_best_checkpoint_uses_its_average(fitted):
    trainer, recorder = fitted["trainer"], fitted["recorder"]
    best = trainer.checkpoint_callback.best_model_path
    trainer.test(fitted["module"], datamodule=fitted["datamodule"], ckpt_path="best", verbose=False)
    assert torch.equal(recorder.tested, flat(torch.load(best, weights_only=False)["state_dict"]))


def test_resume_from_last_continues_raw_weights_and_average(fitted, tmp_path):
    last = torch.load(fitted["out"] / "checkpoints" / "last.ckpt", weights_only=False)
    cfg = compose_cfg(tmp_path, "trainer.max_epochs=3")
    recorder = Recorder()
    datamodule, module, trainer, _ = build(cfg, recorder)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(fitted["out"] / "checkpoints" / "last.ckpt"))
    assert trainer.global_step == 24 and [step for step, _, _ in recorder.validations] == [24]
    # Training went on from the raw weights, not from the average the state_dict holds ...
    assert torch.equal(recorder.first_train_batch, flat(last["current_model_state"]))
    # ... and the average from the stored one, with its count of updates.
    average, updates = recorder.first_average
    assert torch.equal(average, flat(last["state_dict"])) and updates == 16
    assert not torch.allclose(flat(module), recorder.raw)


def test_entry_point_resumes_an_ema_run_from_last_ckpt(fitted, tmp_path, data_dir):
    last = fitted["out"] / "checkpoints" / "last.ckpt"
    result = run_entry("vitlab.train", *OVERRIDES, "trainer.max_epochs=3", f"ckpt_path={last}", "name=resumed",
                       cwd=tmp_path, data_dir=data_dir)
    assert "Restoring states from the checkpoint path" in result.stdout + result.stderr
    run = tmp_path / "outputs" / "runs" / "resumed"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 24
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert "current_model_state" in ckpt and not torch.equal(flat(ckpt["state_dict"]), flat(ckpt["current_model_state"]))
