"""The SimpleViT's interchangeable parts besides attention: the MLP (GELU or SwiGLU), patch
dropout, and attention pooling. Parts that stand in for each other share one constructor
signature and are chosen by name through the plain dicts ``MLPS``; see ``simple_vit.py``."""

from __future__ import annotations

import torch
from timm.layers import AttentionPoolLatent, SwiGLU
from torch import nn

from vitlab.models.attention import dropout, layer_scale


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear, GELU, Linear (the ViT's; vit-pytorch's parameter names)."""

    def __init__(self, dim: int, hidden_dim: int, dropout_rate: float = 0.0, layer_scale_init: float | None = None):
        super().__init__()
        self.net = self.build_net(dim, hidden_dim)
        # Outside `net`, which keeps its parameter names (those of vit_pytorch's SimpleViT).
        self.layer_scale = layer_scale(dim, layer_scale_init)
        self.dropout = dropout(dropout_rate)

    @staticmethod
    def build_net(dim: int, hidden_dim: int) -> nn.Module:
        return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layer_scale(self.net(x)))


def swiglu_hidden(mlp_dim: int) -> int:
    """SwiGLU's hidden width for a GELU MLP of ``mlp_dim``: two thirds of it, rounded, so its three
    dim x hidden matrices hold as many weights as the GELU MLP's two (Shazeer 2020, Sec. 2);
    the biases differ by mlp_dim / 3."""
    return max(1, round(2 * mlp_dim / 3))


class SwiGLUFeedForward(FeedForward):
    """Pre-norm SwiGLU MLP (Shazeer 2020): LayerNorm, then timm's ``SwiGLU``,
    fc2(SiLU(fc1_g x) * fc1_x x), with biases, at ``swiglu_hidden(hidden_dim)``."""

    @staticmethod
    def build_net(dim: int, hidden_dim: int) -> nn.Module:
        return nn.Sequential(nn.LayerNorm(dim), SwiGLU(dim, swiglu_hidden(hidden_dim)))


#: ``model.mlp`` -> the block's MLP.
MLPS = {"gelu": FeedForward, "swiglu": SwiGLUFeedForward}


class PatchDropout(nn.Module):
    """PatchDropout (Liu et al. 2023): in training, each image keeps a random subset of
    ``max(1, int(n * (1 - prob)))`` of its n patch tokens; evaluation sees all of them.

    Returns the kept tokens and their indices (None when nothing is dropped), so that what
    travels with a token (its rotary position) can follow it. The draw is vit-pytorch's (the
    top k of Gaussian noise per image, from torch's generator, which every checkpoint carries):
    with the same seed the kept patches are the same as in its ``simple_vit_with_patch_dropout``.
    Written here rather than taken from timm, whose ``PatchDropout`` draws another subset
    (an ascending argsort) and so could not be checked against that reference step by step.
    """

    def __init__(self, prob: float):
        super().__init__()
        self.prob = prob

    def keep_count(self, n: int) -> int:
        return max(1, int(n * (1 - self.prob)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.training or self.prob == 0:
            return x, None
        b, n, _ = x.shape
        keep = torch.randn(b, n, device=x.device).topk(self.keep_count(n), dim=-1).indices
        return x[torch.arange(b, device=x.device)[:, None], keep], keep


class MAPPool(AttentionPoolLatent):
    """Multi-head attention pooling (big_vision's ``MAPHead``, Zhai et al. 2022): a learned query
    attends over the tokens (with qkv biases), then x + MLP(LayerNorm(x)). timm's
    ``AttentionPoolLatent`` with one latent, a LayerNorm before the MLP and the MLP at the
    blocks' width (``mlp_dim``); (batch, n, dim) in, (batch, dim) out."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__(dim, num_heads=heads, mlp_ratio=mlp_dim / dim, qkv_bias=True, norm_layer=nn.LayerNorm)


def patch_tokens(x: torch.Tensor, prefix: int, suffix: int) -> torch.Tensor:
    """The patch tokens of a sequence laid out as [prefix tokens, patches, suffix tokens]."""
    return x[:, prefix: x.shape[1] - suffix]


__all__ = ["FeedForward", "MAPPool", "MLPS", "PatchDropout", "SwiGLUFeedForward", "patch_tokens", "swiglu_hidden"]
