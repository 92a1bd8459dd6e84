"""LightningModule for image classification: training logic only.

The network arrives constructed; the optimiser and LR schedule arrive as partially applied
callables from the config (``_partial_: true``), so nothing here names a concrete model,
optimiser or scheduler.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from timm.optim import param_groups_layer_decay
from torchmetrics.classification import MulticlassAccuracy

from vitlab.errors import first_line
from vitlab.transfer import classifier, head_parameter_names

#: ``module.freeze``: train everything, or the head alone on a frozen backbone.
FREEZE = ("none", "backbone")


def flexi_patch_size(sizes: Sequence[int], seed: int, step: int) -> int:
    """FlexiViT's patch size for a training step: drawn uniformly from ``sizes`` by a generator
    seeded with (seed, step), as big_vision's flexi trainer does, so a resumed run draws what an
    uninterrupted one would, on every process of a DDP run alike."""
    return int(sizes[np.random.default_rng([seed, step]).integers(len(sizes))])


def check_test_variants(net: nn.Module, channels: int, image_sizes: Sequence[int] = (),
                        patch_sizes: Sequence[int] | None = (), settings: tuple[str, str] = (
                            "module.test_image_sizes", "module.test_patch_sizes")) -> None:
    """Refuse, before training or testing, test variants the network cannot run (``settings``
    names them as the user set them): other patch sizes need a forward that takes ``patch_size``
    (vitlab's SimpleViT); each other image size gets one forward of a blank image, in evaluation
    mode and without touching the random generators."""
    image_setting, patch_setting = settings
    if patch_sizes and "patch_size" not in inspect.signature(net.forward).parameters:
        raise ValueError(f"{patch_setting}={list(patch_sizes)} tests at other patch sizes, which vitlab's SimpleViT "
                         f"does (model=simple_vit and its sizes, with model.patch_norm=false); {type(net).__name__}'s "
                         f"forward takes no patch_size: set {patch_setting}=null.")
    if not image_sizes:
        return
    device = next((p.device for p in net.parameters()), None)
    training = net.training
    net.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for size in image_sizes:
                try:
                    net(torch.zeros(1, channels, int(size), int(size), device=device))
                except Exception as error:  # noqa: BLE001 - whatever the network says, in one line
                    reason = first_line(error).rstrip(".")
                    hint = (" timm's ViTs read other sizes with +model.kwargs.dynamic_img_size=true."
                            if type(net).__module__.startswith("timm.") else "")
                    raise ValueError(f"{image_setting}={list(image_sizes)}: {type(net).__name__} cannot read {size} px "
                                     f"images ({reason}).{hint} Choose sizes it reads, or {image_setting}=[].") from None
    finally:
        net.train(training)


class ImageClassifier(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        label_smoothing: float = 0.0,
        test_hflip: bool = False,
        pad_eval_batches: bool = False,
        seed: int = 0,
        test_image_sizes: Sequence[int] = (),
        test_patch_sizes: Sequence[int] | None = (),
        layer_decay: float | None = None,
        freeze: str = "none",
    ):
        super().__init__()
        # The network's own config is saved by the run (config.yaml); keep the checkpoint's
        # hyperparameters to plain values.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "pad_eval_batches", "test_image_sizes",
                                          "test_patch_sizes", "layer_decay", "freeze"])
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = label_smoothing
        self.test_hflip = test_hflip
        # A compiled network evaluates a smaller (last) batch padded to the largest evaluation batch
        # so far, so that evaluation runs one graph, not a second one for a dynamic batch size.
        self.pad_eval_batches = pad_eval_batches
        self._eval_batch = 0
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        #: FlexiViT: a network with ``flexi_patch_sizes`` trains each step at one of them.
        self.seed = seed
        # The test split again, in the same pass, at other image sizes (bilinear resize of the
        # normalised images: test/acc@40px) and patch sizes (FlexiViT: test/acc@p7).
        self.test_variants = {f"{size}px": {"image_size": int(size)} for size in test_image_sizes or ()}
        self.test_variants.update({f"p{size}": {"patch_size": int(size)} for size in test_patch_sizes or ()})
        self.variant_acc = nn.ModuleDict({name: MulticlassAccuracy(num_classes=num_classes, average="micro")
                                          for name in self.test_variants})
        # Fine-tuning: layer-wise learning-rate decay, and a frozen backbone (a linear probe).
        if layer_decay is not None and (isinstance(layer_decay, bool) or not 0 < layer_decay <= 1):
            raise ValueError(f"module.layer_decay={layer_decay!r} must be null (off) or in (0, 1], e.g. 0.75: block i "
                             f"of n learns at lr x layer_decay^(n + 1 - i).")
        if freeze not in FREEZE:
            raise ValueError(f"module.freeze={freeze!r} is not one of {', '.join(FREEZE)}: backbone trains the "
                             f"head alone (a linear probe).")
        self.layer_decay, self.freeze = layer_decay, freeze
        if freeze == "backbone":
            head = head_parameter_names(net)
            for name, param in net.named_parameters():
                param.requires_grad_(name in head)

    def train(self, mode: bool = True) -> ImageClassifier:
        # A frozen backbone stays in evaluation mode (no dropout, patch dropout or drop path):
        # the linear probe reads the features the network gives at test time.
        super().train(mode)
        if self.freeze == "backbone":
            self.net.eval()
            classifier(self.net).train(mode)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        sizes = getattr(self.net, "flexi_patch_sizes", None)
        if self.training and sizes:
            return self.net(images, patch_size=flexi_patch_size(sizes, self.seed, self.global_step))
        if self.training or not self.pad_eval_batches:
            return self.net(images)
        n = len(images)
        self._eval_batch = max(self._eval_batch, n)
        if n == self._eval_batch:
            return self.net(images)
        # Up to the largest evaluation batch so far; samples do not interact in the network, so
        # the zero images leave the real ones' logits as they were.
        padding = images.new_zeros((self._eval_batch - n, *images.shape[1:]))
        return self.net(torch.cat([images, padding]))[:n]

    def test_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for testing; with ``test_hflip``, test-time augmentation: the log of the mean
        class probabilities of each image and its mirror (cross_entropy and the accuracy take
        log-probabilities as logits)."""
        if not self.test_hflip:
            return self(images)
        probs = self(images).float().softmax(-1) + self(images.flip(-1)).float().softmax(-1)
        return (probs / 2).log()

    def variant_logits(self, images: torch.Tensor, image_size: int | None = None,
                       patch_size: int | None = None) -> torch.Tensor:
        """Logits of the test images resized to ``image_size`` or cut into patches of ``patch_size``."""
        if image_size and image_size != images.shape[-1]:
            images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                   antialias=image_size < images.shape[-1])
        return self.net(images, patch_size=patch_size) if patch_size else self.net(images)

    def _shared_step(self, batch, stage: str, accuracy: MulticlassAccuracy) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and the logits that were scored."""
        images, targets = batch
        logits = self.test_logits(images) if stage == "test" else self(images)
        # Label smoothing is a training regulariser; val/test report the plain loss.
        smoothing = self.label_smoothing if stage == "train" else 0.0
        # Targets are class indices (B,) or, after MixUp/CutMix, class probabilities (B, C);
        # cross_entropy takes both and smooths probabilities as (1 - s) * p + s / C, the same
        # as mixing smoothed one-hot targets.
        loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets  # the dominant class of a mixed target
        accuracy(logits, labels)
        # Training loss per step (the learning curve), val/test loss per epoch: one key each.
        train = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=not train, prog_bar=True, batch_size=len(labels),
                 sync_dist=not train)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        if stage == "test":
            for name, variant in self.test_variants.items():
                self.variant_acc[name](self.variant_logits(images, **variant), labels)
                self.log(f"test/acc@{name}", self.variant_acc[name], on_step=False, on_epoch=True)
        return loss, logits

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        # Every parameter group follows one schedule: log it once, as train/lr (with layer decay,
        # the head's, which has the full rate).
        lr = max(group["lr"] for group in self.trainer.optimizers[0].param_groups)
        self.log("train/lr", lr, on_step=True, on_epoch=False)
        loss, _ = self._shared_step(batch, "train", self.train_acc)
        if not torch.isfinite(loss):
            # Stop here rather than train on garbage; the run is recorded as failed.
            raise FloatingPointError(
                f"train/loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}) "
                f"with learning rate {lr:.3g}: lower optimizer.lr or set trainer.gradient_clip_val=1.0."
            )
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        # The scored logits (with test_hflip, of the averaged probabilities), for callbacks
        # that count per class.
        return self._shared_step(batch, "test", self.test_acc)[1]

    def predict_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # Predictions are made as the run tests: with test_hflip, from the averaged probabilities.
        return self.test_logits(images)

    def parameter_groups(self) -> list[dict]:
        """Weight decay on weight matrices only: not on norms, biases or embeddings. With
        ``layer_decay``, timm's layer-wise groups (BEiT's scheme; the network's ``group_matcher``
        orders its parameters by depth), each with its ``lr_scale``."""
        no_decay_names = getattr(self.net, "no_weight_decay", lambda: set())()
        if self.layer_decay is not None:
            groups = param_groups_layer_decay(self.net, no_weight_decay_list=no_decay_names,
                                              layer_decay=self.layer_decay)
            for group in groups:
                if group["weight_decay"]:
                    del group["weight_decay"]  # the optimizer's own weight decay, as without layer decay
            return groups
        decay, no_decay = [], []
        for name, param in self.net.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or name in no_decay_names else decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        options = {}
        if self.trainer.gradient_clip_val and getattr(self.optimizer_factory, "keywords", {}).get("fused"):
            # A fused step unscales gradients itself, so Lightning cannot clip them first under
            # mixed precision: clipping takes the plain (foreach) step.
            options["fused"] = False
        optimizer = self.optimizer_factory(self.parameter_groups(), **options)
        for group in optimizer.param_groups:
            # Layer decay: a group's rate is scaled before the schedule records it as its base.
            group["lr"] *= group.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
