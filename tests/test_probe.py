"""Probes of frozen features (vitlab.probe): the kNN and ridge classifiers on features whose
answers are known, the callback in a short real training run (metrics.json, TensorBoard), its
head-input hook against plain feature passes, vitlab.eval probe=true on another dataset, and the
one-line errors."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from conftest import CONFIG_DIR, SLICE
from inprocess import assert_short_failure, run_in_process
from tbutil import scalar_tags
from vitlab.data import SyntheticDataModule
# Imported here, not inside a test: Lightning binds its log handler to the stderr of the moment.
from vitlab.eval import main as eval_main
from vitlab.models import SimpleViT
from vitlab.module import ImageClassifier
from vitlab.probe import (FeatureProbe, bank_indices, eval_probe, fewshot_accuracies, fewshot_indices, knn_accuracy,
                          knn_predict, probe_network, ridge_accuracy)
from vitlab.train import main as train_main

PROBE_KEYS = {"probe/knn_acc", "probe/fewshot_1shot", "probe/fewshot_5shot", "probe/fewshot_10shot",
              "probe/fewshot_25shot"}


def clusters(per_class: int, num_classes: int = 10, dim: int = 10, noise: float = 0.3, seed: int = 0):
    """Points around ``num_classes`` well separated centres (3 x a basis vector each). (Feature
    dimensions of pure noise would not do for 1 shot: standardised by the spread of one point
    per class, they weigh as much as the others, as in big_vision's probe.)"""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    centres = 3.0 * torch.eye(num_classes, dim)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=gen), labels


# --- the classifiers ------------------------------------------------------------------------------

def test_ridge_probe_on_linearly_separable_features_is_always_right():
    train, train_labels = clusters(25)
    test, test_labels = clusters(40, seed=1)
    assert ridge_accuracy(train, train_labels, test, test_labels, 10) == 1.0
    # 1 to 25 images per class, 3 draws each: every fit separates the classes.
    assert fewshot_accuracies(train, train_labels, test, test_labels, 10) == {1: 1.0, 5: 1.0, 10: 1.0, 25: 1.0}


def test_ridge_probe_is_the_closed_form_ridge_regression():
    """Fewer points than features (the code solves the N x N system): the weights of the usual
    D x D normal equations on standardised features and the bias column give the same answers."""
    gen = torch.Generator().manual_seed(0)
    train, labels = torch.randn(6, 20, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])
    test, test_labels = torch.randn(50, 20, generator=gen), torch.randint(3, (50,), generator=gen)
    mean, std = train.double().mean(0), train.double().std(0, unbiased=False) + 1e-5

    def design(x):
        z = (x.double() - mean) / std
        return torch.cat([z, torch.full((len(z), 1), 100.0, dtype=torch.float64)], 1)

    x, y = design(train), 2.0 * nn.functional.one_hot(labels, 3).double() - 1
    weights = torch.linalg.solve(x.T @ x + 1024.0 * torch.eye(21, dtype=torch.float64), x.T @ y)
    expected = (design(test) @ weights).argmax(1)
    assert ridge_accuracy(train, labels, test, test_labels, 3) == pytest.approx(
        (expected == test_labels).double().mean().item())


def test_knn_on_clustered_features_is_always_right():
    bank, bank_labels = clusters(30)
    queries, query_labels = clusters(20, seed=1)
    assert knn_accuracy(bank, bank_labels, queries, query_labels, 10, k=20, temperature=0.07) == 1.0


def test_knn_on_a_hand_made_case_weights_the_neighbours_by_similarity():
    """Bank: (1, 0) of class 0, (0, 1) and (0.8, 0.6) of class 1; the query (1, 0.1) has cosine
    similarities 0.995, 0.0995 and 0.856 with them. With k=3 and T=1 class 1 wins,
    e^0.0995 + e^0.856 = 3.46 against e^0.995 = 2.70; DINO's T=0.07 makes the closest dominate,
    e^14.2 against e^1.42 + e^12.2: class 0. With k=1 the nearest alone decides: class 0."""
    bank, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]), torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.1]])
    assert knn_predict(bank, labels, query, 2, k=3, temperature=1.0).tolist() == [1]
    assert knn_predict(bank, labels, query, 2, k=3, temperature=0.07).tolist() == [0]
    assert knn_predict(bank, labels, query, 2, k=1, temperature=1.0).tolist() == [0]
    # The scale of the features does not count (cosine), k beyond the bank is the whole bank.
    assert knn_predict(5 * bank, labels, 0.1 * query, 2, k=50, temperature=1.0).tolist() == [1]
    # Four queries, the last one labelled 0 where the vote gives 1: accuracy 3/4.
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.0, 2.0]])
    assert knn_accuracy(bank, labels, queries, torch.tensor([0, 1, 1, 0]), 2, k=1) == 0.75


def test_draws_are_seeded_nested_and_balanced():
    labels = torch.arange(4).repeat(30)
    one, five = (fewshot_indices(labels, 4, n, draw=0, seed=7) for n in (1, 5))
    assert torch.equal(one, fewshot_indices(labels, 4, 1, draw=0, seed=7)), "the same draw every time"
    assert set(one.tolist()) <= set(five.tolist()), "a draw's 5 shots contain its 1 shot"
    assert torch.bincount(labels[five], minlength=4).tolist() == [5, 5, 5, 5]
    assert not torch.equal(five, fewshot_indices(labels, 4, 5, draw=1, seed=7)), "draws differ"
    # A class with fewer images than shots gives what it has.
    assert len(fewshot_indices(torch.tensor([0, 0, 1]), 2, 5, draw=0, seed=0)) == 3
    assert torch.equal(bank_indices(50, 100, seed=0), torch.arange(50))
    picked = bank_indices(1000, 100, seed=3)
    assert len(picked) == 100 == len(set(picked.tolist())) and torch.equal(picked, picked.sort().values)
    assert torch.equal(picked, bank_indices(1000, 100, seed=3)) and not torch.equal(picked, bank_indices(1000, 100, 4))


# --- the callback ----------------------------------------------------------------------------------

def tiny_vit(num_classes: int = 3) -> SimpleViT:
    torch.manual_seed(0)
    return SimpleViT(image_size=8, patch_size=4, num_classes=num_classes, dim=16, depth=1, heads=2, dim_head=8,
                     mlp_dim=32, channels=1)


def synthetic(num_classes: int = 3) -> SyntheticDataModule:
    return SyntheticDataModule(image_size=8, channels=1, num_classes=num_classes, train_size=120, val_size=50,
                               test_size=10, batch_size=16, eval_batch_size=16)


def validator(callbacks) -> L.Trainer:
    return L.Trainer(accelerator="cpu", precision="32-true", logger=False, callbacks=callbacks,
                     enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)


def test_the_head_input_hook_gives_the_probes_of_plain_feature_passes(monkeypatch):
    """Validation of the classifier hands the probe the head's inputs (no extra pass over the
    validation images); the network alone (vitlab.eval's path) computes them with net.features:
    the same scores."""
    settings = dict(bank_size=100, k=5, shots=[1, 5], draws=2)
    net = tiny_vit()
    calls = []
    plain = net.features
    monkeypatch.setattr(net, "features", lambda images, *a: calls.append(len(images)) or plain(images, *a))
    module = ImageClassifier(net=net, num_classes=3, optimizer=None)
    hooked = FeatureProbe(net, **settings)
    validator([hooked]).validate(module, datamodule=synthetic(), verbose=False)
    assert set(hooked.results) == {"probe/knn_acc", "probe/fewshot_1shot", "probe/fewshot_5shot"}
    assert hooked.counts == {"bank_images": 100, "val_images": 50}
    assert sum(calls) == 100 + 50, "features of the bank and, once, of the validation images (the logits' pass)"
    assert net.linear_head._forward_pre_hooks == {}, "the hook is gone after validation"

    probe = eval_probe(net, dict(settings, seed=0))
    assert probe_network(net, synthetic(), validator([probe]), probe) == pytest.approx(hooked.results)


def test_a_training_run_logs_the_probes_into_metrics_json_and_tensorboard(probe_run):
    run = probe_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    history = metrics["history"]
    # every_n_epochs=2 over 3 epochs: epoch 2, and epoch 3 as the last; none at epoch 1.
    assert [PROBE_KEYS <= set(entry) for entry in history] == [False, True, True]
    assert not any(key.startswith("probe/") for key in history[0])
    assert all(0 <= history[-1][key] <= 1 for key in PROBE_KEYS)
    assert {key: metrics[key] for key in PROBE_KEYS} == {key: history[-1][key] for key in PROBE_KEYS}
    assert {"test/acc", "best_val_acc", "best_checkpoint"} <= set(metrics) and "val/acc" in history[0], \
        "the default callbacks still run"
    assert PROBE_KEYS <= scalar_tags(run)
    assert "probes (epoch 2, bank 300, 256 validation images" in (run / "train.log").read_text()


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, data_dir):
    """A few batches of real Fashion-MNIST training with the probes every 2 epochs."""
    work = tmp_path_factory.mktemp("probe_run")
    with pytest.MonkeyPatch.context() as patch:
        result = run_in_process(train_main, "vitlab.train", [*SLICE, "trainer.max_epochs=3", "probe.every_n_epochs=2",
                                                             "probe.bank_size=300", "name=probed"],
                                cwd=work, data_dir=data_dir, monkeypatch=patch, capsys=_NoCapture())
    assert result.returncode == 0
    return work / "outputs" / "runs" / "probed"


class _NoCapture:
    """What run_in_process needs of pytest's capsys, for a module fixture (which has none)."""

    def readouterr(self):
        return type("Out", (), {"out": "", "err": ""})()


def test_eval_probes_a_fashion_mnist_checkpoint_on_mnist(probe_run, data_dir, tmp_path, monkeypatch, capsys):
    ckpt = probe_run / "checkpoints" / "last.ckpt"
    result = run_in_process(eval_main, "vitlab.eval", [f"ckpt_path={ckpt}", "data=mnist", "probe=true", "name=mnist",
                                                       "probe_settings.bank_size=400", "trainer.limit_test_batches=1",
                                                       "trainer.limit_val_batches=1", "data.eval_batch_size=128"],
                            cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "outputs" / "eval" / "mnist" / "metrics.json").read_text())
    assert metrics["data"] == "vitlab.data.MNISTDataModule" and 0 <= metrics["test/acc"] <= 1
    assert PROBE_KEYS <= set(metrics) and all(0 <= metrics[key] <= 1 for key in PROBE_KEYS)
    assert metrics["probe_settings"]["bank_images"] == 400 and metrics["probe_settings"]["val_images"] == 128
    # Well above the 10 % of chance: the features of 24 steps on clothes already tell digits apart.
    assert metrics["probe/knn_acc"] > 0.2


def test_eval_probes_data_with_other_classes_without_testing(probe_run, data_dir, tmp_path, monkeypatch, capsys):
    ckpt = probe_run / "checkpoints" / "last.ckpt"
    result = run_in_process(eval_main, "vitlab.eval", [
        f"ckpt_path={ckpt}", "data=synthetic", "data.image_size=28", "data.channels=1", "data.num_classes=4",
        "data.train_size=200", "data.val_size=64", "probe=true", "name=four", "probe_settings.shots=[1,5]"],
        cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "eval" / "four"
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test/acc" not in metrics and metrics["test_skipped"] and not (out / "confusion_matrix.csv").exists()
    assert {"probe/knn_acc", "probe/fewshot_1shot", "probe/fewshot_5shot"} <= set(metrics)
    assert metrics["probe_settings"]["val_images"] == 64 and metrics["probe_settings"]["shots"] == [1, 5]


# --- errors, before anything runs ------------------------------------------------------------------

class NoFeatures(nn.Module):
    """A classifier without pooled features (``model._target_=test_probe.NoFeatures``)."""

    def __init__(self, *, image_size: int, channels: int, num_classes: int, **_):
        super().__init__()
        self.head = nn.Linear(channels * image_size * image_size, num_classes)

    def forward(self, images):
        return self.head(images.flatten(1))


def test_probes_of_a_model_without_features_stop_before_training(tmp_path, data_dir, monkeypatch, capsys):
    result = run_in_process(train_main, "vitlab.train", [*SLICE, "model._target_=test_probe.NoFeatures",
                                                         "probe.every_n_epochs=1", "name=nofeat"],
                            cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert_short_failure(result, "error: ValueError: probe.every_n_epochs=1 probes the pooled features of the network, "
                                 "but NoFeatures has no features(images) method returning (batch, dim): add one")
    run = tmp_path / "outputs" / "runs" / "nofeat"
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    assert not (run / "checkpoints").exists(), "nothing trained"
    # The same model trains without probes; vitlab.eval's probe names its own switch.
    with pytest.raises(ValueError, match=r"^probe=true probes .* or leave probe=false\.$"):
        eval_probe(NoFeatures(image_size=4, channels=1, num_classes=2), {})


@pytest.mark.parametrize(("setting", "fragment"), [
    ({"every_n_epochs": 0}, "probe.every_n_epochs=0 must be a positive number of epochs"),
    ({"shots": [0, 5]}, "probe.shots=[0, 5] must be a list of positive numbers"),
    ({"k": 2.5}, "probe.k=2.5 must be a positive whole number"),
    ({"temperature": 0}, "probe.temperature=0 must be a positive number"),
])
def test_bad_probe_settings_are_named(setting, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as info:
        FeatureProbe(tiny_vit(), **{"every_n_epochs": 1, **setting})
    assert "\n" not in str(info.value)


def test_eval_and_train_configs_probe_alike():
    train = yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())["probe"]
    evaluated = yaml.safe_load((CONFIG_DIR / "eval.yaml").read_text())["probe_settings"]
    assert train.pop("every_n_epochs") is None, "off by default"
    assert train == evaluated
    assert (train["bank_size"], train["k"], train["shots"], train["draws"]) == (10000, 20, [1, 5, 10, 25], 3)
    assert math.isclose(train["temperature"], 0.07) and train["l2_reg"] == 2.0**10
