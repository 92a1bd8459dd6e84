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


def test_warmup_in_steps_and_clipping_with_a_fused_optimizer():
    from functools import partial

    from vitlab.optim import warmup_cosine

    param = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([param], lr=1.0)
    schedule = warmup_cosine(opt, total_steps=100, warmup_steps=10, warmup_start_factor=0.1)
    rates = []
    for _ in range(12):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.1) and rates[10] == pytest.approx(1.0) and rates[5] < 1.0
    # Longer than the run: cut to the run less one step.
    warmup_cosine(torch.optim.SGD([param], lr=1.0), total_steps=4, warmup_steps=10_000)
    with pytest.raises(ValueError, match="scheduler.warmup_steps=-1 must be"):
        warmup_cosine(opt, total_steps=10, warmup_steps=-1)

    # Gradient clipping under bf16-mixed with the fused AdamW of conf/optimizer/adamw.yaml.
    import lightning as L

    from vitlab.models import SimpleViT
    from vitlab.module import ImageClassifier

    net = SimpleViT(image_size=8, channels=1, num_classes=2, patch_size=4, dim=16, depth=1, heads=2, dim_head=8,
                    mlp_dim=16)
    module = ImageClassifier(net=net, num_classes=2, optimizer=partial(torch.optim.AdamW, lr=1e-3, fused=True))
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(2, (8,)))
    trainer = L.Trainer(max_steps=2, gradient_clip_val=1.0, precision="bf16-mixed", accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.global_step == 2
