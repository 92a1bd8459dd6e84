"""What a network costs: parameters and forward FLOPs per image, for any image model."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """SDPA's CPU kernel, which torch's counter leaves out (it counts the CUDA kernels only):
    the same count as theirs, two matmuls of the scores."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: Operators torch's flop counter does not know, with their formulas.
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module, image_size: int, channels: int, training: bool = False) -> int:
    """Forward FLOPs for one image, counted by torch's flop counter on the eager network:
    ``model.forward`` bypasses ``nn.Module.compile`` (which wraps ``__call__``), so a compiled
    network is counted without compiling anything, and SDPA on a CPU like the explicit attention
    (``EXTRA_FLOP_FORMULAS``). ``training``: the forward as training runs it,
    which is cheaper where the network drops tokens in training (``model.patch_dropout``), counted
    on two images (a batch norm in training mode needs more than one value). The network is left
    as it was: its buffers (batch-norm statistics) and torch's random state (the draws of dropout
    and patch dropout) are put back."""
    was_training = model.training
    device = next(model.parameters()).device
    images = 2 if training else 1
    buffers = {name: value.clone() for name, value in model.named_buffers()} if training else {}
    model.train(training)
    # Not under no_grad: torch's module tracker, which the counter uses, then fails on an expanded
    # parameter (the MAP head's query).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        model.forward(torch.zeros(images, channels, image_size, image_size, device=device))
    if training:
        with torch.no_grad():
            for name, value in model.named_buffers():
                value.copy_(buffers[name])
    model.train(was_training)
    return int(counter.get_total_flops()) // images
