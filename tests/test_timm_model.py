"""timm's models as vitlab's network: ``model=timm model.name=<timm name>``."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import run_entry
from inprocess import assert_short_failure, run_in_process
from tbutil import hparams

from vitlab.analyze import main as analyze_main
from vitlab.models.timm_model import create
from vitlab.train import main as train_main

FAST = ("debug=fast", "model=timm", "trainer.enable_progress_bar=false", "logger=none", "torch_threads=1")


def test_a_timm_vit_trains_records_and_evaluates_like_simplevit(tmp_path, data_dir):
    run_entry("vitlab.train", *FAST, "name=deit", "model.kwargs.drop_path_rate=0.1", cwd=tmp_path,
              data_dir=data_dir)
    run = tmp_path / "outputs/runs/deit"
    metrics = json.loads((run / "metrics.json").read_text())
    # deit_tiny at patch 7 on 28 px, 1 channel, 10 classes.
    assert metrics["status"] == "completed" and metrics["params"] == 5_353_738 and metrics["flops_per_image"] > 0
    (best,) = (run / "checkpoints").glob("best*.ckpt")
    result = run_entry("vitlab.eval", f"ckpt_path={best}", "name=deit_eval", "+data.eval_batch_size=64",
                       "+trainer.limit_test_batches=2", cwd=tmp_path, data_dir=data_dir)
    assert json.loads((tmp_path / "outputs/eval/deit_eval/metrics.json").read_text())["test/acc"] == \
        pytest.approx(metrics["test/acc"]), result.stderr[-2000:]
    refused = run_entry("vitlab.eval", f"ckpt_path={best}", "positions=interpolate", cwd=tmp_path, data_dir=data_dir,
                        check=False)
    assert refused.returncode == 1 and "error: ValueError: positions=interpolate places the patches of vitlab's " \
        "SimpleViT" in refused.stderr and "leave positions=null" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.parametrize("override, fragment", [
    ("model.name=deit_tiny_patch15", "is not a timm model"),
    ("model.patch_size=null", "cuts 16x16 patches, which do not divide data.image_size=28: set model.patch_size"),
    ("model.name=resnet18", "resnet18 takes no patch size"),
    ("model.pretrained=true", "model.pretrained=true: timm could not fetch the weights of deit_tiny_patch16_224"),
])
def test_bad_timm_settings_are_named_in_one_line(tmp_path, data_dir, monkeypatch, capsys, override, fragment):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: fail at once rather than after timeouts
    result = run_in_process(train_main, "vitlab.train", [*FAST, "name=bad", override], cwd=tmp_path,
                            data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert_short_failure(result, fragment)


def test_a_cnn_reads_the_image_at_its_own_size():
    net = create(name="resnet18", image_size=28, channels=1, num_classes=10, patch_size=None)
    assert net.get_classifier().out_features == 10 and net.conv1.in_channels == 1


def test_a_sweep_over_simple_vit_and_a_timm_model_names_each_network(tmp_path, data_dir, monkeypatch, capsys):
    """``-m model=simple_vit,timm model.name=deit_tiny_patch16_224``: the override names the timm job's
    network; the SimpleViT job keeps ``simple_vit`` in its config, the summary, HParams and MLflow."""
    mlflow = pytest.importorskip("mlflow")
    run_entry("vitlab.train", "-m", "model=simple_vit,timm", "model.name=deit_tiny_patch16_224", "debug=fast",
              "trainer.enable_progress_bar=false", "logger=[tensorboard,mlflow]", "torch_threads=1", "sweep=mixed",
              cwd=tmp_path, data_dir=data_dir)
    sweep = tmp_path / "outputs" / "multirun" / "mixed"
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    named = [("simple_vit", "simple_vit"), ("timm", "deit_tiny_patch16_224")]
    assert [(r["model"], r["model.name"], r["status"]) for r in rows] == [(*n, "completed") for n in named]
    assert "name: simple_vit" in (sweep / rows[0]["job"] / "config.yaml").read_text()
    for row, (choice, name) in zip(rows, named):
        values, _ = hparams(sweep / row["job"])
        assert (values["choice/model"], values["model/name"]) == (choice, name)
    # A client of this store: mlflow's module-level calls follow whatever store an earlier test of this
    # process set (mlflow.set_tracking_uri outranks the environment).
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mixed").experiment_id],
                              order_by=["tags.`mlflow.runName`"])
    assert [run.data.params["model.name"] for run in runs] == ["simple_vit", "deit_tiny_patch16_224"]

    # vitlab.analyze reads SimpleViT's attention only: a timm checkpoint is one line; in a sweep,
    # that job is listed as failed and the SimpleViT job is analysed.
    (best,) = (sweep / rows[1]["job"] / "checkpoints").glob("best*.ckpt")
    small = ["images_for_distance=16", "batch_size=16", "first_classes=2", "device=cpu"]
    result = run_in_process(analyze_main, "vitlab.analyze", [f"ckpt_path={best}", *small], cwd=tmp_path,
                            data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert_short_failure(result, "is a timm.models.vision_transformer.VisionTransformer, not vitlab's SimpleViT",
                         "train with model=simple_vit")
    result = run_in_process(analyze_main, "vitlab.analyze", [f"sweep={sweep}", "name=mixed", *small], cwd=tmp_path,
                            data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    analysis = json.loads((tmp_path / "outputs" / "analyze" / "mixed" / "analysis.json").read_text())
    assert list(analysis["jobs"]) == [rows[0]["job"]] and list(analysis["failed"]) == [rows[1]["job"]]


@pytest.mark.parametrize("override, fragment", [
    ("model.reg_tokens=4", "model.reg_tokens=4 is a switch of vitlab's SimpleViT (model=simple_vit, vit_tiny_28, "
                           "vit_small_32, vit_ti, vit_s, vit_b or vit_l), not of model=timm: timm's ViTs take "
                           "+model.kwargs.reg_tokens=<n>."),
    ("model.pool=map", "model.pool=map is a switch of vitlab's SimpleViT"),
    ("+model.depth=4", "model.depth is not a field of model=timm: timm's own arguments go under model.kwargs "
                       "(+model.kwargs.depth=4)"),
    ("module.test_patch_sizes=[14]", "module.test_patch_sizes=[14] tests at other patch sizes, which vitlab's "
                                     "SimpleViT does"),
    ("module.test_image_sizes=[56]", "module.test_image_sizes=[56]: VisionTransformer cannot read 56 px images "
                                     "(Input height (56) doesn't match model (28)). timm's ViTs read other sizes "
                                     "with +model.kwargs.dynamic_img_size=true."),
])
def test_a_simple_vit_feature_under_model_timm_stops_before_training(tmp_path, data_dir, monkeypatch, capsys,
                                                                     override, fragment):
    result = run_in_process(train_main, "vitlab.train", [*FAST, "name=switch", override], cwd=tmp_path,
                            data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert_short_failure(result, f"error: ValueError: {fragment}")
    metrics = json.loads((tmp_path / "outputs" / "runs" / "switch" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and not metrics.get("history")


def test_records_from_before_model_names_are_the_same_experiment():
    """A run recorded before model configs had a name trained SimpleViT: ``reuse`` still finds it."""
    from vitlab.results import deciding_config

    old = {"model": {"_target_": "vitlab.models.SimpleViT", "dim": 128}, "seed": 0}
    new = {"model": {"_target_": "vitlab.models.SimpleViT", "name": "simple_vit", "dim": 128}, "seed": 0}
    assert deciding_config(new) == deciding_config(old)
    timm = {"model": {"_target_": "vitlab.models.timm_model.create", "name": "deit_tiny_patch16_224"}, "seed": 0}
    assert deciding_config(timm) != deciding_config({**timm, "model": {**timm["model"], "name": "vit_tiny_patch16_224"}})


@pytest.mark.parametrize("attention", ["auto", "math", "sdpa"])
def test_timm_attention_paths_compute_the_same_function(attention):
    """``model.attention``: timm's explicit softmax (auto on a CPU, math) and its SDPA give the same
    logits and gradients; auto switches by the input's device, also in a deep copy (EMA)."""
    import copy

    import torch

    torch.manual_seed(0)
    kwargs = dict(name="deit_tiny_patch16_224", image_size=28, channels=1, num_classes=10, patch_size=7,
                  kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2})
    reference = create(**kwargs, attention="sdpa")
    net = create(**kwargs, attention=attention)
    net.load_state_dict(reference.state_dict())
    x = torch.randn(3, 1, 28, 28)
    ours, theirs = net(x), reference(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    for (name, a), b in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    flags = {m.fused_attn for m in net.modules() if hasattr(m, "fused_attn")}
    assert flags == {attention == "sdpa"}
    if attention == "auto":
        twin = copy.deepcopy(net)
        twin._vitlab_attention_device = None
        for module in twin.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True
        twin(x)
        assert {m.fused_attn for m in twin.modules() if hasattr(m, "fused_attn")} == {False}
        assert {m.fused_attn for m in net.modules() if hasattr(m, "fused_attn")} == {False}


def test_a_bad_timm_attention_is_named_in_one_line():
    with pytest.raises(ValueError, match=r"model.attention='flash' is not one of auto, math, sdpa"):
        create(name="deit_tiny_patch16_224", image_size=28, channels=1, num_classes=10, patch_size=7,
               attention="flash")
