"""What a network costs: parameters and forward FLOPs per image, for any image model."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module, image_size: int, channels: int) -> int:
    """Forward FLOPs for one image, counted by torch's flop counter on the eager network:
    ``model.forward`` bypasses ``nn.Module.compile`` (which wraps ``__call__``), so a compiled
    network is counted without compiling anything."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        model.forward(torch.zeros(1, channels, image_size, image_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())
