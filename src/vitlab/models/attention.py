"""Multi-head self-attention of the SimpleViT and its options: the explicit reference and SDPA
(one function, two code paths), QK-norm (Dehghani et al. 2023) and rotary position embedding
applied to queries and keys (``vitlab.models.position``), LayerScale on the output (Touvron et
al. 2021). Each option is a part built in ``__init__`` (``nn.Identity`` when off, so it adds no
checkpoint keys); the forward reads the same with any of them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import LayerScale
from torch import nn

from vitlab.models.position import rotate_pairs

ATTENTIONS = ("math", "sdpa", "auto")


def dropout(p: float) -> nn.Module:
    # Identity at 0 keeps the default model's forward exactly as without dropout.
    return nn.Dropout(p) if p > 0 else nn.Identity()


def layer_scale(dim: int, init: float | None) -> nn.Module:
    """timm's ``LayerScale`` (a learned per-channel gain, CaiT's Eq. 1) starting at ``init``, or
    nothing: a model without it has no ``gamma`` keys."""
    return LayerScale(dim, init_values=init) if init is not None else nn.Identity()


#: On a CPU, ``attention="auto"`` runs the explicit attention on as many images at a time as keep
#: one slice's scores (heads x n x n) within this many bytes. Whole-batch scores at 196 tokens
#: (patch 2 on 28 px: 128 x 4 x 196 x 196 floats, 79 MB, six such tensors per block and step)
#: neither stay in cache nor get reused by the allocator (glibc serves blocks above 32 MiB by
#: fresh mmaps: ~2 GB of page faults a step), so a training step ran 8-10x slower than at 49
#: tokens for 5x the FLOPs. In slices of 8 MiB (scripts/bench_attention.py, 2 cores, 1 MiB L2
#: each, 32 MiB L3) it ran 1.8-1.9x faster in fp32, 1.2-1.4x in bf16; 2-16 MiB measured alike. The
#: default patch 4 (49 tokens, 4.9 MB at batch 128) stays one slice, the reference unchanged.
CPU_CHUNK_BYTES = 8 * 2**20


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference: softmax(q k^T * scale) v with every score materialised; (..., n, d) in and out."""
    return (q @ k.transpose(-1, -2) * scale).softmax(dim=-1) @ v


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, max_bytes: int | None = None
) -> torch.Tensor:
    """``explicit_attention`` on near-equal slices of the batch (dim 0), each slice's scores
    within ``max_bytes`` (default ``CPU_CHUNK_BYTES``; at least one image a slice): the same
    operations on each image, so the same function; one slice (no split) where the batch fits."""
    batch, heads, n = q.shape[0], q.shape[1], q.shape[-2]
    per_slice = max(1, (max_bytes or CPU_CHUNK_BYTES) // (heads * n * n * q.element_size()))
    if per_slice >= batch:
        return explicit_attention(q, k, v, scale)
    size = -(-batch // -(-batch // per_slice))  # as many slices as needed, sizes evened out
    return torch.cat([explicit_attention(*qkv, scale) for qkv in zip(q.split(size), k.split(size), v.split(size))])


class Attention(nn.Module):
    """Pre-norm multi-head self-attention without qkv bias; inner width is heads * dim_head.

    ``attention="math"`` is the explicit softmax(q k^T / sqrt(d)) v reference
    (``explicit_attention``, the whole batch at once); ``"sdpa"`` calls
    ``F.scaled_dot_product_attention`` (flash/memory-efficient kernels where the device has
    them). ``"auto"`` picks per device at forward time: SDPA on GPUs; on CPUs the explicit
    attention in batch slices (``chunked_attention``, see ``CPU_CHUNK_BYTES``): as fast as the
    whole-batch reference at 49 tokens, where SDPA's CPU kernel was 0.9x in fp32 and 0.4x in
    bf16, and 1.8-1.9x (fp32) or 1.2-1.4x (bf16) faster at 196, where SDPA was 1.8-2.1x and
    0.7-0.8x. All three compute the same function.

    ``qk_norm``: a LayerNorm over each head's query and key (one LayerNorm of ``dim_head``
    shared by the heads, as ViT-22B and timm's ``Attention(qk_norm=True)``), before the scores
    and before any rotation. ``rope`` (forward argument): the rotations of a rotary
    embedding for every token (complex units), from ``vitlab.models.position.Rope2d``, applied
    to q and k by ``rotate_pairs``.
    ``layer_scale``: the initial value of a LayerScale gain on the output, or null.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, attention: str = "auto", dropout_rate: float = 0.0,
                 qk_norm: bool = False, layer_scale_init: float | None = None):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.attention = attention
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.q_norm = nn.LayerNorm(dim_head) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim_head) if qk_norm else nn.Identity()
        self.to_out = nn.Linear(inner_dim, dim, bias=False)
        self.layer_scale = layer_scale(dim, layer_scale_init)
        self.dropout = dropout(dropout_rate)

    def use_sdpa(self, x: torch.Tensor) -> bool:
        if self.attention == "auto":
            return x.device.type != "cpu"
        return self.attention == "sdpa"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention itself, (batch, heads, n, dim_head) in and out, by ``self.attention``."""
        if self.use_sdpa(q):
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        if self.attention == "auto":  # on a CPU
            return chunked_attention(q, k, v, self.scale)
        return explicit_attention(q, k, v, self.scale)

    def qkv(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, (batch, heads, n, dim_head) each, normed and rotated as
        configured: what the scores are computed from (also for reading attention maps)."""
        q, k, v = rearrange(self.to_qkv(self.norm(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotate_pairs(q, rope), rotate_pairs(k, rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        out = self.attend(*self.qkv(x, rope))
        return self.dropout(self.layer_scale(self.to_out(rearrange(out, "b h n d -> b n (h d)"))))


def attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) over the keys, in fp32: (..., n, n) from (..., n, d) queries and keys."""
    return (q.float() @ k.float().transpose(-1, -2) * scale).softmax(dim=-1)


@contextmanager
def recording_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Read the attention weights of every ``Attention`` module of ``model`` while inside the block.

    Yields a list that each forward of an ``Attention`` module appends its weights to, as a
    (batch, heads, n, n) fp32 tensor without gradient, in call order: one forward of a SimpleViT
    appends block 0, 1, ..., depth - 1. The weights are recomputed by a forward hook from
    ``Attention.qkv(x, rope)`` (queries and keys normed and rotated exactly as the module's own
    forward uses them), so they are the same whichever kernel the module runs (``math``, ``sdpa``,
    which returns no weights, or ``auto``): the module's output before ``to_out`` is these weights
    times its values (``tests/test_analyze.py``). The hooks exist only inside the block, so training
    and evaluation outside it run exactly as before; inside it each block computes q and k twice.

        with recording_attention(net) as maps:
            net(images)
        last = maps[-1].mean(dim=1)  # the last block's attention, averaged over heads
    """
    modules = [module for module in model.modules() if isinstance(module, Attention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no vitlab attention module (vitlab.models.attention.Attention) "
                         f"to read attention from: analyse a vitlab SimpleViT (model=simple_vit or one of its sizes).")
    maps: list[torch.Tensor] = []

    def record(module: Attention, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        x = args[0] if args else kwargs["x"]
        rope = args[1] if len(args) > 1 else kwargs.get("rope")
        with torch.no_grad():
            q, k, _ = module.qkv(x, rope)
            maps.append(attention_weights(q, k, module.scale))

    handles = [module.register_forward_hook(record, with_kwargs=True) for module in modules]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["ATTENTIONS", "Attention", "CPU_CHUNK_BYTES", "attention_weights", "chunked_attention",
           "explicit_attention", "recording_attention"]
