"""Batched augmentation on the training device: one tensor operation for the whole batch
instead of a Python call per image (per-sample transforms in loader workers would compete
with the model for the same CPU cores)."""

from __future__ import annotations

import torch
from torch import nn


class RandomCropFlip(nn.Module):
    """Per-image random crop after zero padding (a random shift of up to ``padding`` pixels)
    and, if ``hflip``, a random horizontal flip with probability 1/2.

    Works on uint8 or float batches (B, C, H, W); each image draws its own shift and flip.
    """

    def __init__(self, padding: int = 0, hflip: bool = False):
        super().__init__()
        if padding < 0:
            raise ValueError(f"data.augment.padding={padding} must be >= 0")
        self.padding = padding
        self.hflip = hflip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        if self.padding:
            p = self.padding
            padded = nn.functional.pad(images, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b, 1, 1), device=images.device)
            dx = torch.randint(0, 2 * p + 1, (b, 1, 1), device=images.device)
            rows = dy + torch.arange(h, device=images.device).view(1, h, 1)
            cols = dx + torch.arange(w, device=images.device).view(1, 1, w)
            batch = torch.arange(b, device=images.device).view(b, 1, 1)
            images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
        if self.hflip:
            flip = torch.rand(b, 1, 1, 1, device=images.device) < 0.5
            images = torch.where(flip, images.flip(-1), images)
        return images.contiguous()

    def extra_repr(self) -> str:
        return f"padding={self.padding}, hflip={self.hflip}"
