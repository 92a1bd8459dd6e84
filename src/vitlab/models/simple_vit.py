"""SimpleViT: the plain ViT of Beyer, Zhai & Kolesnikov (2022), "Better plain ViT baselines
for ImageNet-1k".

Patchify -> LayerNorm-Linear-LayerNorm embedding -> fixed 2-D sincos position embedding ->
pre-norm Transformer blocks -> final LayerNorm -> mean pooling -> linear head.
Regularisers for longer or larger runs, all off by default: dropout on each residual branch,
stochastic depth (drop path), and a zero-initialised head.

Plain PyTorch on purpose: no Lightning, no Hydra. The constructor's keyword arguments are the
fields of the ``model`` config group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn
from torchvision.ops import StochasticDepth

POOLS = ("mean", "cls")
POS_EMBS = ("sincos2d", "learned", "none")
ATTENTIONS = ("math", "sdpa", "auto")
HEAD_INITS = ("xavier", "zero")


def _dropout(p: float) -> nn.Module:
    # Identity at 0 keeps the default model's forward exactly as without dropout.
    return nn.Dropout(p) if p > 0 else nn.Identity()


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, shape (h * w, dim).

    A quarter of the channels each for sin(x), cos(x), sin(y), cos(y), with frequencies
    spaced geometrically from 1 to 1/temperature (Beyer et al. 2022, Sec. 2).
    """
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1)
    omega = 1.0 / temperature**omega
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).float()


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, dim),
        )
        # Outside `net`, which keeps its parameter names (those of vit_pytorch's SimpleViT).
        self.dropout = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.net(x))


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
    """

    def __init__(self, dim: int, heads: int, dim_head: int, attention: str = "auto", dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.attention = attention
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)
        self.dropout = _dropout(dropout)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = self.attend(q, k, v)
        return self.dropout(self.to_out(rearrange(out, "b h n d -> b n (h d)")))


class Transformer(nn.Module):
    def __init__(
        self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, attention: str,
        dropout: float = 0.0, drop_path: float = 0.0,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, attention, dropout), FeedForward(dim, mlp_dim, dropout)])
            for _ in range(depth)
        )
        # Stochastic depth (Huang et al. 2016) per sample, its rate rising linearly from 0 at the
        # first block to `drop_path` at the last, as in DeiT (Touvron et al. 2021). A separate
        # list without parameters, so checkpoint keys do not depend on it.
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.drop_paths = nn.ModuleList(StochasticDepth(rate, mode="row") for rate in rates)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for (attn, ff), drop_path in zip(self.layers, self.drop_paths):
            x = drop_path(attn(x)) + x
            x = drop_path(ff(x)) + x
        return self.norm(x)


class SimpleViT(nn.Module):
    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        channels: int = 3,
        dim_head: int = 64,
        pool: str = "mean",
        pos_emb: str = "sincos2d",
        attention: str = "auto",
        head_init: str = "xavier",
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        _validate(
            image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=dim,
            depth=depth, heads=heads, mlp_dim=mlp_dim, channels=channels, dim_head=dim_head,
            pool=pool, pos_emb=pos_emb, attention=attention, head_init=head_init,
            dropout=dropout, drop_path=drop_path,
        )
        grid = image_size // patch_size
        patch_dim = channels * patch_size * patch_size
        self.pool = pool
        self.pos_emb_kind = pos_emb
        self.head_init = head_init
        self.num_patches = grid * grid

        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        if pos_emb == "sincos2d":
            # Fixed, so a buffer built once; non-persistent keeps it out of checkpoints.
            self.register_buffer("pos_embedding", posemb_sincos_2d(grid, grid, dim), persistent=False)
        elif pos_emb == "learned":
            self.pos_embedding = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        else:
            self.pos_embedding = None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None

        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, attention, dropout, drop_path)
        self.linear_head = nn.Linear(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deliberate initialisation as in big_vision's ViT: Xavier-uniform linear weights,
        # zero biases, LayerNorm at identity; class token small normal.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        if self.head_init == "zero":
            # Beyer et al. 2022 (big_vision's head_zeroinit): every class starts at logit 0, so
            # the initial loss is exactly log(num_classes).
            nn.init.zeros_(self.linear_head.weight)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that are embeddings (besides norms and biases, found by shape)."""
        return {name for name in ("pos_embedding", "cls_token") if isinstance(getattr(self, name), nn.Parameter)}

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(img)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding.to(x.dtype)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        x = self.transformer(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.linear_head(x)


def _validate(**cfg) -> None:
    """Fail at construction, naming the offending arguments and the fix."""
    for name in ("image_size", "patch_size", "num_classes", "dim", "depth", "heads", "mlp_dim", "channels", "dim_head"):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    image_size, patch_size = cfg["image_size"], cfg["patch_size"]
    if image_size % patch_size:
        divisors = [d for d in range(1, image_size + 1) if image_size % d == 0]
        raise ValueError(
            f"patch_size={patch_size} does not divide image_size={image_size}: "
            f"choose a patch size from {divisors}, or images whose side is a multiple of {patch_size}."
        )
    if cfg["pos_emb"] == "sincos2d" and cfg["dim"] % 4:
        lower = cfg["dim"] - cfg["dim"] % 4
        raise ValueError(
            f"dim={cfg['dim']} is not a multiple of 4, which the 2-D sincos position "
            f"embedding needs: use dim={lower or 4} or {lower + 4}, or pos_emb=learned."
        )
    for name, allowed in (("pool", POOLS), ("pos_emb", POS_EMBS), ("attention", ATTENTIONS), ("head_init", HEAD_INITS)):
        if cfg[name] not in allowed:
            raise ValueError(f"{name}={cfg[name]!r} is not one of {', '.join(allowed)}.")
    for name in ("dropout", "drop_path"):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(
                f"{name}={value!r} is not a probability in [0, 1): use 0 to turn it off, "
                f"or a rate such as 0.1."
            )


__all__ = ["SimpleViT", "chunked_attention", "explicit_attention", "posemb_sincos_2d"]
