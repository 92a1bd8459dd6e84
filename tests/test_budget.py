"""Compute-matched budgets: budget.flops and budget.minutes set the run's steps, the schedule
follows them, the last step is validated, and metrics.json records the budget."""

import json

import pytest
from conftest import SLICE, run_entry
from omegaconf import OmegaConf
from test_configs import compose_train

from vitlab import budget
from vitlab.config import instantiate_model
from vitlab.models import flops_per_image

FLOPS = 5.7e9


def forward_flops(*overrides) -> int:
    cfg = compose_train(*SLICE, *overrides)
    return flops_per_image(instantiate_model(cfg.model), 28, 1)


def test_plan_turns_flops_into_steps_over_every_device():
    cfg = OmegaConf.create({"budget": {"flops": 6e9, "minutes": None}, "data": {"batch_size": 10},
                            "trainer": {"devices": 2, "num_nodes": 1, "accumulate_grad_batches": 5}})
    assert budget.images_per_step(cfg) == 100
    plan = budget.plan(cfg, flops_per_image=1e6)
    assert plan == {"flops": 6e9, "steps": 20, "images": 2000, "train_flops": 6e9}
    cfg.budget.flops = None
    assert budget.plan(cfg, 1e6) is None, "no budget: trainer.max_epochs decides"
    cfg.budget.minutes = 2
    plan = budget.plan(cfg, 1e6, measure=lambda: {"measured_images_per_s": 50.0, "device": "test"})
    assert plan["steps"] == 60 and plan["device"] == "test" and plan["minutes"] == 2.0
    resumed = budget.plan(cfg, 1e6, measure=lambda: pytest.fail("a resumed run is not timed again"), previous=plan)
    assert resumed == plan


@pytest.mark.parametrize("budget_overrides, message", [
    (("budget.flops=1e12", "budget.minutes=5"), "budget.flops=1000000000000.0 and budget.minutes=5 are both set"),
    (("budget.flops=-1",), "budget.flops=-1 must be a number above 0"),
    (("budget.minutes=soon",), "budget.minutes='soon' must be a number above 0"),
])
def test_bad_budgets_are_refused_in_one_line(budget_overrides, message):
    cfg = compose_train(*budget_overrides)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        budget.plan(cfg, flops_per_image=1000)


def test_a_sweep_at_equal_flops_trains_each_patch_size_for_its_own_steps(tmp_path, data_dir):
    run_entry("vitlab.train", "-m", "model.patch_size=4,7", f"budget.flops={FLOPS}", *SLICE, cwd=tmp_path,
              data_dir=data_dir)
    jobs = sorted(p for p in tmp_path.glob("outputs/multirun/*/*/*") if (p / "metrics.json").is_file())
    assert [job.name for job in jobs] == ["0_model.patch_size=4", "1_model.patch_size=7"]
    steps = []
    for job, patch in zip(jobs, (4, 7)):
        metrics = json.loads((job / "metrics.json").read_text())
        expected = round(FLOPS / (3 * forward_flops(f"model.patch_size={patch}") * 64))
        assert metrics["status"] == "completed"
        assert metrics["budget"] == {"flops": FLOPS, "steps": expected, "images": expected * 64,
                                     "train_flops": expected * 3 * metrics["flops_per_image"] * 64}
        assert metrics["global_step"] == expected and metrics["history"][-1]["step"] == expected
        # 8 batches an epoch: the last, partial epoch was validated and checkpointed too.
        assert expected % 8 and len(metrics["history"]) == -(-expected // 8)
        assert metrics["best_val_acc"] is not None and "val/acc" in metrics["history"][-1]
        # The cosine schedule ends at the budget's last step (min_lr_ratio 0), not at max_epochs.
        assert metrics["history"][-1]["train/lr"] < 0.05 * 2e-3
        assert "max_steps: %d" % expected in (job / "config.yaml").read_text()
        steps.append(expected)
    assert steps[0] < steps[1], "the cheaper patch-7 model gets more steps for the same FLOPs"


def test_training_flops_count_the_tokens_patch_dropout_keeps_and_leave_the_network_as_it_was():
    import torch

    net = instantiate_model(compose_train(*SLICE, "model.patch_dropout=0.5").model).eval()
    full = flops_per_image(net, 28, 1)
    state = torch.get_rng_state()
    training = flops_per_image(net, 28, 1, training=True)
    assert torch.equal(torch.get_rng_state(), state), "counting draws nothing from the run's random stream"
    # Half the patch tokens: the linear layers half, the attention scores a quarter (43 % in all).
    assert 0.35 * full < training < 0.5 * full
    assert not net.training and flops_per_image(net.train(), 28, 1) == full and net.training
    timm = pytest.importorskip("timm")
    cnn = timm.create_model("resnet18", in_chans=1, num_classes=10)
    before = {name: value.clone() for name, value in cnn.named_buffers()}
    assert flops_per_image(cnn, 28, 1, training=True) == flops_per_image(cnn, 28, 1)
    assert all(torch.equal(value, before[name]) for name, value in cnn.named_buffers()), "batch-norm statistics kept"


def test_a_flops_budget_with_patch_dropout_counts_the_cheaper_training_steps(tmp_path, data_dir):
    run_entry("vitlab.train", "model.patch_dropout=0.5", f"budget.flops={FLOPS}", *SLICE, "name=pd", cwd=tmp_path,
              data_dir=data_dir)
    metrics = json.loads((tmp_path / "outputs/runs/pd/metrics.json").read_text())
    assert metrics["train_flops_per_image"] < 0.5 * metrics["flops_per_image"]
    expected = round(FLOPS / (3 * metrics["train_flops_per_image"] * 64))
    assert metrics["budget"]["steps"] == expected and metrics["global_step"] == expected
    assert expected > 2 * round(FLOPS / (3 * metrics["flops_per_image"] * 64))


def test_sdpa_on_a_cpu_is_counted_like_the_explicit_attention():
    """torch's flop counter knows SDPA's CUDA kernels only; a CPU run with attention=sdpa (or a
    timm model, whose attention is SDPA by default) would be counted without its attention."""
    counts = {flops_per_image(instantiate_model(compose_train(*SLICE, f"model.attention={a}").model), 28, 1)
              for a in ("math", "sdpa", "auto")}
    assert len(counts) == 1
    from vitlab.models.timm_model import create

    timm_counts = {flops_per_image(create(name="deit_tiny_patch16_224", image_size=28, channels=1, num_classes=10,
                                          patch_size=7, attention=a, kwargs={"embed_dim": 48, "depth": 2}), 28, 1)
                   for a in ("math", "sdpa")}
    assert len(timm_counts) == 1
