import pytest
import torch

from vitlab.models import SimpleViT
from vitlab.module import ImageClassifier
from vitlab.optim import warmup_cosine


def test_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_fraction=0.1, warmup_start_factor=0.01)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # rising during warmup
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then falling
    assert lrs[55] == pytest.approx(0.5, abs=0.02)  # half-way through the cosine
    assert lrs[-1] < 0.01


def test_bad_warmup_fraction():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="scheduler.warmup_fraction=1.5"):
        warmup_cosine(opt, total_steps=10, warmup_fraction=1.5)


def test_weight_decay_skips_norms_biases_and_embeddings():
    net = SimpleViT(image_size=28, patch_size=7, channels=1, num_classes=10, dim=32, depth=1, heads=2, dim_head=16,
                    mlp_dim=64, pos_emb="learned", pool="cls")
    module = ImageClassifier(net, num_classes=10, optimizer=torch.optim.AdamW)
    decay, no_decay = module.parameter_groups()
    assert no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "pos_embedding" not in decayed and "cls_token" not in decayed
    assert not any(n.endswith(".bias") for n in decayed)
    assert not any("norm" in n for n in decayed)
    assert "linear_head.weight" in decayed and "transformer.layers.0.0.to_qkv.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))
