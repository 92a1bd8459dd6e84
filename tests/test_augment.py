"""Training-batch augmentations: torchvision's operations with per-image parameters, stage
order, training batches only, soft targets in the loss, and the augment group end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from conftest import SLICE, run_entry
from test_configs import compose_train
from vitlab.data import SyntheticDataModule
from vitlab.data.augment import Augmentations, MixUpCutMix, RandAugment, RandomCropFlip, RandomErasing
from vitlab.module import ImageClassifier


def sample_image():
    """A 3x32x32 uint8 image with no symmetry, so every operation changes it differently."""
    gen = torch.Generator().manual_seed(0)
    ramp = torch.arange(32, dtype=torch.float32)
    rows, cols = ramp.view(32, 1).expand(32, 32), ramp.view(1, 32).expand(32, 32)
    base = torch.stack([cols * 4 + rows * 2, rows * 6, cols * 3])
    noise = torch.randint(0, 40, (3, 32, 32), generator=gen)
    return (base + noise).clamp(0, 255).to(torch.uint8)


def key(image):
    return bytes(image.contiguous().numpy())


@pytest.mark.parametrize("m, options", [(9, {}), (30, {}), (20, {"fill": [10, 200, 30]}),
                                        (20, {"interpolation": "bilinear", "fill": 128})])
def test_randaugment_ops_are_torchvisions(m, options):
    """vitlab's table of operations (RANDAUGMENT_OPS) against torchvision's public v2.RandAugment:
    each (op, sign) gives one of torchvision's outputs, together they give all of them, and a
    batch spreads over them image by image. After a torchvision upgrade, a failure here names the
    operations whose magnitude or kernel changed upstream."""
    image = sample_image()
    torch.manual_seed(0)
    # Older torchvision (0.24) takes the interpolation as an InterpolationMode only.
    reference = v2.RandAugment(num_ops=1, magnitude=m, **options | {
        "interpolation": v2.InterpolationMode(options.get("interpolation", "nearest"))})
    possible = {key(reference(image)) for _ in range(400)}
    assert len(possible) >= 20  # 14 ops, 10 of them with two signs; a few coincide

    ours = RandAugment(n=1, m=m, **options)
    keys = [k for k in range(2 * len(ours.ops)) if k % 2 == 0 or ours.signed[k // 2]]
    outputs = {f"{ours.ops[k // 2]}{'-' if k % 2 else '+'}": key(o)
               for k, o in zip(keys, ours.apply(image.expand(len(keys), -1, -1, -1), torch.tensor(keys)))}
    assert not [op for op, o in outputs.items() if o not in possible], "ops unlike torchvision's (named)"
    assert len(possible - set(outputs.values())) == 0, "torchvision's RandAugment gives outputs no vitlab op gives"

    torch.manual_seed(1)
    batch = RandAugment(n=1, m=m, **options)(image.unsqueeze(0).repeat(256, 1, 1, 1))
    assert batch.shape == (256, 3, 32, 32) and batch.dtype == torch.uint8
    assert {key(o) for o in batch} == possible, "per-image draws: a batch of copies gives every output"


def test_randaugment_applies_n_operations_per_image():
    torch.manual_seed(0)
    batch = sample_image().unsqueeze(0).repeat(64, 1, 1, 1)
    assert torch.equal(RandAugment(n=0)(batch), batch)
    one = {key(o) for o in RandAugment(n=1, m=9)(batch)}
    two = {key(o) for o in RandAugment(n=2, m=9)(batch)}
    assert len(two) > len(one), "two operations per image give more distinct results than one"
    # Draws come from torch's global generator: a restored RNG state (a resumed run) repeats them.
    state = torch.get_rng_state()
    first = RandAugment(n=2, m=9)(batch)
    torch.set_rng_state(state)
    assert torch.equal(RandAugment(n=2, m=9)(batch), first)
    with pytest.raises(TypeError, match="uint8"):
        RandAugment()(batch.float())
    with pytest.raises(ValueError, match=r"randaugment.m=31 must be in \[0, 30\]"):
        RandAugment(m=31)


def boxes(before, after):
    """For each image: None if unchanged, else the (top, left, height, width) of the changed box,
    asserting that the change is exactly one rectangle."""
    result = []
    for b, a in zip(before, after):
        changed = (b != a).any(0)
        if not changed.any():
            result.append(None)
            continue
        rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
        top, left = int(rows[0]), int(cols[0])
        h, w = int(rows[-1]) - top + 1, int(cols[-1]) - left + 1
        assert changed[top:top + h, left:left + w].all() and changed.sum() == h * w, "one rectangle"
        result.append((top, left, h, w))
    return result


def test_random_erasing_erases_one_box_per_image_with_its_own_draw():
    torch.manual_seed(0)
    images = torch.randn(1000, 3, 32, 32) + 5  # never 0, so every erased pixel shows
    out = RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0)(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    found = boxes(images, out)
    erased = [b for b in found if b is not None]
    assert 0.44 < len(erased) / len(found) < 0.56, "each image is erased with probability p"
    assert all((out[i][:, t:t + h, l:l + w] == 0).all() for i, b in enumerate(found) if b for t, l, h, w in [b])
    areas = torch.tensor([h * w / 32**2 for _, _, h, w in erased])
    assert areas.min() >= 0.01 and areas.max() <= 0.36  # scale (0.02, 0.33), up to rounding of the sides
    assert len(set(erased)) > 0.9 * len(erased), "boxes are drawn per image"
    assert torch.equal(RandomErasing(p=0.0)(images), images)
    noise = RandomErasing(p=1.0, value="random")(images)
    assert all(b is not None for b in boxes(images, noise))


def test_crop_flip_works_on_float_and_uint8_batches():
    torch.manual_seed(0)
    batch = sample_image().unsqueeze(0).repeat(32, 1, 1, 1)
    for images in (batch, batch.float()):
        out = RandomCropFlip(padding=4, hflip=True)(images)
        assert out.shape == images.shape and out.dtype == images.dtype
        assert len({key(o) for o in out}) > 10


def test_mixup_mixes_each_image_with_its_neighbour_and_the_targets_alike():
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 8, 8), torch.arange(16) % 10  # neighbours' labels differ
    mix = MixUpCutMix(num_classes=10, mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0)
    onehot = F.one_hot(labels, 10).float()
    lams = set()
    for _ in range(3):
        out, targets = mix(images, labels)
        assert targets.shape == (16, 10) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(16))
        # The mixing ratio, read off the first target, explains every image and target.
        lam = targets[0, labels[0]].item()
        torch.testing.assert_close(out, lam * images + (1 - lam) * images.roll(1, 0))
        torch.testing.assert_close(targets, lam * onehot + (1 - lam) * onehot.roll(1, 0))
        lams.add(round(lam, 6))
    assert len(lams) == 3, "a new ratio for every batch"


def test_cutmix_pastes_one_box_from_the_neighbour_with_area_weighted_targets():
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    mix = MixUpCutMix(num_classes=10, mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0)
    for _ in range(5):
        out, targets = mix(images, labels)
        found = boxes(images, out)
        neighbour = images.roll(1, 0)
        for i, box in enumerate(found):
            kept = 1.0
            if box is not None:
                t, l, h, w = box
                assert torch.equal(out[i][:, t:t + h, l:l + w], neighbour[i][:, t:t + h, l:l + w])
                kept = 1 - h * w / 32**2
            assert targets[i, labels[i]].item() == pytest.approx(kept, abs=1e-6)


def test_mixup_cutmix_probabilities():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 1, 16, 16), torch.arange(8)
    off = MixUpCutMix(num_classes=10, prob=0.0)
    out, targets = off(images, labels)
    assert torch.equal(out, images) and torch.equal(targets, F.one_hot(labels, 10).float())
    kinds = {"none": 0, "mixup": 0, "cutmix": 0}
    mix = MixUpCutMix(num_classes=10, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.6, switch_prob=0.25)
    for _ in range(400):
        out, _ = mix(images, labels)
        changed = (out != images)
        if not changed.any():
            kinds["none"] += 1
        elif changed.all():
            kinds["mixup"] += 1  # MixUp changes every pixel (lambda < 1)
        else:
            kinds["cutmix"] += 1
    assert 0.3 < kinds["none"] / 400 < 0.5  # 1 - prob
    assert 0.15 < kinds["cutmix"] / (kinds["mixup"] + kinds["cutmix"]) < 0.35  # switch_prob
    with pytest.raises(ValueError, match="mixup_cutmix.prob=1.5 must be a probability"):
        MixUpCutMix(num_classes=10, prob=1.5)


class Stage(torch.nn.Module):
    """Records the dtype it saw; returns its input."""

    def __init__(self, stage):
        super().__init__()
        self.stage, self.seen = stage, None

    def forward(self, images, labels=None):
        self.seen = images.dtype
        return images if labels is None else (images, labels)


def test_pipeline_runs_stages_in_order_whatever_the_config_order():
    labels_stage, normalized, pixels = Stage("labels"), Stage("normalized"), Stage("pixels")
    pipeline = Augmentations({"mix": labels_stage, "erase": normalized, "off": None, "crop": pixels})
    assert list(pipeline.steps) == ["crop", "erase", "mix"]
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    out, labels = pipeline(images, torch.zeros(2, dtype=torch.long), lambda x: x.float() - 1)
    assert (pixels.seen, normalized.seen, labels_stage.seen) == (torch.uint8, torch.float32, torch.float32)
    assert torch.equal(out, images.float() - 1)
    with pytest.raises(ValueError, match="data.augment.crop is 3, not an augmentation module"):
        Augmentations({"crop": 3})


def strong(num_classes=10):
    return {"crop_flip": RandomCropFlip(4, True), "randaugment": RandAugment(2, 9),
            "random_erasing": RandomErasing(0.25), "mixup_cutmix": MixUpCutMix(num_classes)}


def test_augmentation_only_on_training_batches():
    class Trainer:
        training = False

    dm = SyntheticDataModule(image_size=32, channels=3, num_classes=10, train_size=64, val_size=16, test_size=16,
                             batch_size=32, augment=strong())
    dm.trainer = Trainer()
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    out, targets = dm.on_after_batch_transfer((images, labels), 0)
    torch.testing.assert_close(out, dm.normalize(images))
    assert torch.equal(targets, labels)
    dm.trainer.training = True
    out, targets = dm.on_after_batch_transfer((images, labels), 0)
    assert out.shape == images.shape and out.dtype == torch.float32 and not torch.allclose(out, dm.normalize(images))
    assert targets.shape == (32, 10) and targets.dtype == torch.float32


# The module's self.log calls warn outside a Trainer; the losses are what is tested here.
no_trainer = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


def module(label_smoothing):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    return ImageClassifier(net=net, num_classes=5, optimizer=torch.optim.SGD, label_smoothing=label_smoothing)


@no_trainer
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_targets_give_the_hard_loss_when_unmixed(smoothing):
    torch.manual_seed(0)
    classifier = module(smoothing)
    images, labels = torch.randn(8, 3, 2, 2), torch.randint(0, 5, (8,))
    hard, _ = classifier._shared_step((images, labels), "train", classifier.train_acc)
    # MixUpCutMix with prob=0 gives one-hot targets: what a batch it leaves unmixed looks like.
    _, onehot = MixUpCutMix(num_classes=5, prob=0.0)(images, labels)
    soft, _ = classifier._shared_step((images, onehot), "train", classifier.val_acc)
    torch.testing.assert_close(soft, hard)
    torch.testing.assert_close(classifier.train_acc.compute(), classifier.val_acc.compute())


@no_trainer
def test_mixed_targets_give_the_mixed_loss_with_label_smoothing():
    """cross_entropy(lam a + (1 - lam) b) = lam CE(a) + (1 - lam) CE(b), smoothing included: the
    loss of the MixUp paper, and smoothing applied to each label as with hard targets."""
    torch.manual_seed(0)
    classifier = module(0.1)
    images, a, b, lam = torch.randn(8, 3, 2, 2), torch.randint(0, 5, (8,)), torch.randint(0, 5, (8,)), 0.7
    targets = lam * F.one_hot(a, 5).float() + (1 - lam) * F.one_hot(b, 5).float()
    loss, _ = classifier._shared_step((images, targets), "train", classifier.train_acc)
    logits = classifier(images)
    expected = lam * F.cross_entropy(logits, a, label_smoothing=0.1) + (1 - lam) * F.cross_entropy(
        logits, b, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    # Training accuracy counts the dominant label (a, with lam = 0.7).
    assert classifier.train_acc.compute() == pytest.approx((logits.argmax(1) == a).float().mean().item())
    # Validation reports the plain loss.
    val, _ = classifier._shared_step((images, a), "val", classifier.val_acc)
    torch.testing.assert_close(val, F.cross_entropy(logits, a))


def test_augment_group_adds_to_the_dataset_augmentation(tmp_path):
    def augment(*overrides):
        data = compose_train(*overrides, tmp=tmp_path).data
        return None if data.augment is None else dict(data.augment)

    own = augment()
    assert list(own) == ["crop_flip"] and own["crop_flip"]["padding"] == 1
    assert list(augment("augment=randaugment")) == ["crop_flip", "randaugment"]
    assert augment("augment=randaugment")["crop_flip"] == own["crop_flip"]
    assert list(augment("augment=strong")) == ["crop_flip", "randaugment", "random_erasing", "mixup_cutmix"]
    assert list(augment("augment=[none,mixup_cutmix]")) == ["mixup_cutmix"]
    assert augment("augment=none") is None
    assert augment("augment=crop_flip") == augment("augment=basic")
    assert augment("augment=basic")["crop_flip"]["padding"] == 2
    assert augment("data=mnist", "augment=strong")["crop_flip"]["hflip"] is False  # digits are not flipped
    assert augment("data=cifar100", "augment=mixup_cutmix")["mixup_cutmix"]["num_classes"] == 100
    assert augment("data=synthetic", "augment=randaugment").keys() == {"randaugment"}


@pytest.mark.parametrize("augment", ["mixup_cutmix", "randaugment"])
def test_training_runs_with_augmentation(tmp_path, data_dir, augment):
    run_entry("vitlab.train", *SLICE, f"augment={augment}", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
              "torch_threads=1", "logger=csv", "name=aug", cwd=tmp_path, data_dir=data_dir)
    run = tmp_path / "outputs" / "runs" / "aug"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 4
    config = (run / "config.yaml").read_text()
    assert "RandomCropFlip" in config and ("MixUpCutMix" in config if augment == "mixup_cutmix" else "RandAugment" in config)
    logged = (next(run.rglob("metrics.csv"))).read_text().splitlines()[0]
    assert "train/acc" in logged and "train/loss" in logged
