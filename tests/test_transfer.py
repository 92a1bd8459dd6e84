"""Fine-tuning from a checkpoint (``init_from``): a new head, image size or patch size; layer-wise
learning-rate decay; a frozen backbone; a few-label training subset."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import SLICE, run_entry
from einops import rearrange
from inprocess import assert_short_failure, run_in_process
from timm.layers import resample_abs_pos_embed

from vitlab.checkpoint import load_checkpoint
from vitlab.data.base import InMemoryImages, subset
from vitlab.errors import CheckpointError
from vitlab.models import SimpleViT
from vitlab.module import ImageClassifier
from vitlab.train import main as train_main
from vitlab.transfer import init_from_checkpoint, pi_resize_kernel

SMALL = dict(image_size=28, patch_size=4, num_classes=10, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64,
             channels=1)


def save_checkpoint(path, net: torch.nn.Module, **cfg) -> str:
    """A checkpoint as vitlab.train writes it: the LightningModule's ``net.`` weights and the run's model config."""
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "vitlab": {"model": {"_target_": "vitlab.models.SimpleViT", **cfg}}}, path)
    return str(path)


def test_a_new_head_is_zero_and_everything_else_is_loaded(tmp_path):
    torch.manual_seed(0)
    source = SimpleViT(**SMALL)
    path = save_checkpoint(tmp_path / "a.ckpt", source, **SMALL)
    cfg = SMALL | {"num_classes": 5}
    net = SimpleViT(**cfg)
    record = init_from_checkpoint(net, path, cfg)
    assert record["reset"] == ["linear_head.weight", "linear_head.bias"]
    assert not record["resampled"] and record["from"]["num_classes"] == 10
    assert torch.count_nonzero(net.linear_head.weight) == 0 and torch.count_nonzero(net.linear_head.bias) == 0
    for key, value in source.state_dict().items():
        if not key.startswith("linear_head"):
            assert torch.equal(net.state_dict()[key], value), key
    # Same classes, head kept: the same function.
    kept = SimpleViT(**SMALL)
    init_from_checkpoint(kept, path, SMALL, head="keep")
    images = torch.randn(2, 1, 28, 28)
    assert torch.equal(kept.eval()(images), source.eval()(images))


def test_a_learned_position_embedding_is_resampled_bicubically_and_sincos_recomputed(tmp_path):
    torch.manual_seed(0)
    learned = SMALL | {"pos_emb": "learned"}
    path = save_checkpoint(tmp_path / "l.ckpt", SimpleViT(**learned), **learned)
    bigger = learned | {"image_size": 56}
    net = SimpleViT(**bigger)
    record = init_from_checkpoint(net, path, bigger)
    assert record["resampled"] == {"pos_embedding": "7x7 -> 14x14 patches, bicubic"}
    saved = load_checkpoint(path)["state_dict"]["net.pos_embedding"]
    expected = resample_abs_pos_embed(saved[None], new_size=[14, 14], old_size=[7, 7], num_prefix_tokens=0,
                                      interpolation="bicubic", antialias=True)[0]
    assert torch.allclose(net.pos_embedding, expected)
    # Resampling a 7x7 table to 7x7 changes nothing: corners of a 14x14 resample stay close to the source's.
    assert net.pos_embedding.shape == (196, 32)
    # sincos: nothing stored, the new grid's table is the model's own.
    path = save_checkpoint(tmp_path / "s.ckpt", SimpleViT(**SMALL), **SMALL)
    net = SimpleViT(**(SMALL | {"image_size": 56}))
    record = init_from_checkpoint(net, path, SMALL | {"image_size": 56})
    assert not record["resampled"] and net.pos_embedding.shape == (196, 32)


def test_pi_resize_gives_an_upsampled_patch_the_token_of_the_original():
    # The round trip of PI-resize: upsample the patch, resize the kernel the same way, same token.
    torch.manual_seed(0)
    weight = torch.randn(8, 4 * 4 * 3)
    resized = pi_resize_kernel(weight, 8 * 8 * 3, 3, "init_from", "x")
    patch = torch.randn(1, 3, 4, 4)
    upsampled = F.interpolate(patch, size=(8, 8), mode="bilinear", align_corners=False, antialias=False)
    flat = lambda x, p: x.reshape(3, p, p).permute(1, 2, 0).reshape(-1)  # noqa: E731 - pixel order (p1 p2 c)
    assert torch.allclose(resized @ flat(upsampled, 8), weight @ flat(patch, 4), atol=1e-4)


def test_a_model_fine_tuned_at_twice_the_patch_size_reads_twice_as_large_images_alike(tmp_path):
    torch.manual_seed(0)
    cfg = SMALL | {"patch_norm": False}
    source = SimpleViT(**cfg).eval()
    path = save_checkpoint(tmp_path / "p.ckpt", source, **cfg)
    target = cfg | {"image_size": 56, "patch_size": 8}
    net = SimpleViT(**target).eval()
    record = init_from_checkpoint(net, path, target, head="keep")
    assert record["resampled"] == {"to_patch_embedding.2.weight": "patch 4 -> 8, PI-resize"}
    images = torch.randn(2, 1, 28, 28)
    # Each 4x4 patch upsampled to 8x8 on its own (a whole-image resize would mix neighbouring
    # patches at their borders): the same 7x7 grid, the same tokens, the same sincos table.
    patches = rearrange(images, "b c (h p1) (w p2) -> (b h w) c p1 p2", p1=4, p2=4)
    upsampled = F.interpolate(patches, size=(8, 8), mode="bilinear", align_corners=False, antialias=False)
    upsampled = rearrange(upsampled, "(b h w) c p1 p2 -> b c (h p1) (w p2)", b=2, h=7, w=7)
    assert torch.allclose(net(upsampled), source(images), atol=1e-4)


@pytest.mark.parametrize("change, fragment", [
    ({"dim": 64}, "model.dim: checkpoint 32, config 64"),
    ({"depth": 3}, "model.depth: checkpoint 2, config 3"),
    ({"patch_size": 7}, "needs model.patch_norm=false on both runs"),
])
def test_a_model_that_cannot_be_carried_over_is_named(tmp_path, change, fragment):
    path = save_checkpoint(tmp_path / "a.ckpt", SimpleViT(**SMALL), **SMALL)
    with pytest.raises(CheckpointError, match="init_from=") as error:
        init_from_checkpoint(SimpleViT(**(SMALL | change)), path, SMALL | change)
    assert fragment in str(error.value)


def test_keeping_a_head_of_another_size_or_an_unknown_choice_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "a.ckpt", SimpleViT(**SMALL), **SMALL)
    cfg = SMALL | {"num_classes": 3}
    with pytest.raises(CheckpointError, match="use init.head=reset"):
        init_from_checkpoint(SimpleViT(**cfg), path, cfg, head="keep")
    with pytest.raises(ValueError, match="init.head='new' is not one of reset, keep"):
        init_from_checkpoint(SimpleViT(**cfg), path, cfg, head="new")


def test_a_checkpoint_without_vitlab_weights_is_named(tmp_path):
    torch.save({"state_dict": {"model.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="holds no vitlab network weights"):
        init_from_checkpoint(SimpleViT(**SMALL), tmp_path / "other.ckpt", SMALL)


def test_layer_decay_scales_each_depth_and_keeps_weight_decay_off_norms_and_embeddings():
    net = SimpleViT(**(SMALL | {"pos_emb": "learned"}))
    module = ImageClassifier(net, 10, optimizer=lambda groups, **kw: torch.optim.AdamW(groups, lr=1.0,
                                                                                          weight_decay=0.05),
                             layer_decay=0.5)
    module._trainer = SimpleNamespace(gradient_clip_val=None)
    optimizer = module.configure_optimizers()
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    # depth 2: stem 0.5^3, block 0 0.5^2, block 1 and the final norm 0.5, head 1.
    assert lr_of[id(net.to_patch_embedding[2].weight)] == (0.125, 0.05)
    assert lr_of[id(net.pos_embedding)] == (0.125, 0.0)
    assert lr_of[id(net.transformer.layers[0][0].to_qkv.weight)] == (0.25, 0.05)
    assert lr_of[id(net.transformer.layers[1][1].net[1].bias)] == (0.5, 0.0)
    assert lr_of[id(net.transformer.norm.weight)] == (0.5, 0.0)
    assert lr_of[id(net.linear_head.weight)] == (1.0, 0.05)
    assert len(lr_of) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="module.layer_decay=1.5 must be null"):
        ImageClassifier(SimpleViT(**SMALL), 10, optimizer=None, layer_decay=1.5)


def test_a_frozen_backbone_trains_the_head_alone_in_evaluation_mode():
    net = SimpleViT(**(SMALL | {"patch_dropout": 0.5}))
    module = ImageClassifier(net, 10, optimizer=None, freeze="backbone").train()
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"linear_head.weight", "linear_head.bias"}
    assert not net.training and net.linear_head.training and module.training
    assert sum(len(g["params"]) for g in module.parameter_groups()) == 2
    with pytest.raises(ValueError, match="module.freeze='all' is not one of none, backbone"):
        ImageClassifier(SimpleViT(**SMALL), 10, optimizer=None, freeze="all")


def test_a_training_subset_takes_as_many_of_each_class_the_same_every_time():
    labels = torch.arange(10).repeat_interleave(torch.arange(10, 110, 10))  # class c has 10 (c + 1) images
    data = InMemoryImages(torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), labels)
    chosen = subset(data, 55, seed=0)
    assert torch.bincount(chosen.labels).tolist() == [6, 6, 6, 6, 6, 5, 5, 5, 5, 5] or \
        sorted(torch.bincount(chosen.labels).tolist()) == [5] * 5 + [6] * 5
    assert torch.equal(subset(data, 55, seed=0).labels, chosen.labels)
    with pytest.raises(ValueError, match="data.train_subset=600 is more than the 550 training images"):
        subset(data, 600, seed=0)


def test_pretrain_on_fashion_mnist_then_fine_tune_a_probe_on_mnist(tmp_path, data_dir, monkeypatch, capsys):
    run_entry("vitlab.train", *SLICE, "name=pre", "trainer.max_epochs=1", "test=false", cwd=tmp_path,
              data_dir=data_dir)
    source = tmp_path / "outputs/runs/pre/checkpoints/last.ckpt"
    run_entry("vitlab.train", *SLICE, "name=probe", "data=mnist", "data.train_subset=200", f"init_from={source}",
              "module.freeze=backbone", cwd=tmp_path, data_dir=data_dir)
    metrics = json.loads((tmp_path / "outputs/runs/probe/metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["init_from"]["path"] == str(source)
    assert metrics["init_from"]["reset"] == ["linear_head.weight", "linear_head.bias"]
    # 200 images at batch 64: 4 steps an epoch.
    assert metrics["history"][-1]["step"] == 8
    before = load_checkpoint(source)["state_dict"]
    after = load_checkpoint(tmp_path / "outputs/runs/probe/checkpoints/last.ckpt")["state_dict"]
    for key, value in before.items():
        if key.startswith("net.") and "linear_head" not in key:
            assert torch.equal(after[key], value), f"{key} moved in a frozen backbone"
    assert not torch.equal(after["net.linear_head.weight"], torch.zeros_like(after["net.linear_head.weight"]))

    def run(*args):
        return run_in_process(train_main, "vitlab.train", [*SLICE, *args], cwd=tmp_path, data_dir=data_dir,
                              monkeypatch=monkeypatch, capsys=capsys)

    assert_short_failure(run("name=both", f"init_from={source}", f"ckpt_path={source}"), "set only one of them")
    assert_short_failure(run("name=wide", f"init_from={source}", "model.dim=64"),
                         "model.dim: checkpoint 32, config 64", "Only image_size, patch_size and num_classes")
    assert_short_failure(run("name=missing", f"init_from={tmp_path / 'nope.ckpt'}"), "init_from=", "does not exist")
    assert not (source.parent.parent / "wide").exists()
