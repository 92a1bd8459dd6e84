"""Random but learnable images of any size, channel count and number of classes.

Each class is a fixed random template; samples are the template plus noise, so a model can
fit them in a few steps. For smoke tests and for benchmarks that should not touch a disk.
"""

from __future__ import annotations

import torch

from vitlab.data.base import InMemoryImageDataModule, InMemoryImages


def make_images(n: int, image_size: int, channels: int, num_classes: int, seed: int, noise: float = 40.0) -> InMemoryImages:
    gen = torch.Generator().manual_seed(seed)
    # Templates depend only on the shape, so train, val and test share them.
    templates = torch.rand(num_classes, channels, image_size, image_size, generator=torch.Generator().manual_seed(1234)) * 255
    labels = torch.randint(num_classes, (n,), generator=gen)
    images = templates[labels] + noise * torch.randn(n, channels, image_size, image_size, generator=gen)
    return InMemoryImages(images.clamp_(0, 255).to(torch.uint8), labels)


class SyntheticDataModule(InMemoryImageDataModule):
    def __init__(self, *, train_size: int = 2048, val_size: int = 256, test_size: int = 256, **kwargs):
        kwargs.setdefault("mean", [0.5] * kwargs["channels"])
        kwargs.setdefault("std", [0.29] * kwargs["channels"])
        super().__init__(**kwargs)  # with seed (default 0): the seed of the samples and of the training order
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    def setup(self, stage: str | None = None) -> None:
        shape = (self.image_size, self.channels, self.num_classes)
        if self.train_set is None:
            self.train_set = make_images(self.sizes["train"], *shape, seed=self.seed)
            self.val_set = make_images(self.sizes["val"], *shape, seed=self.seed + 1)
            self.test_set = make_images(self.sizes["test"], *shape, seed=self.seed + 2)
