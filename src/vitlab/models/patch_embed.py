"""The patch embedding: cut the image into patches, (LayerNorm over each patch's pixels,)
Linear, LayerNorm; at another patch size than its own, FlexiViT's PI-resize of the kernel.

FlexiViT (Beyer et al. 2023, Sec. 3.4): for a patch x of the model's size p and its bilinear
resize B x to size q, the kernel w' = pinv(B^T) w gives <w', B x> = <w, x> whenever q >= p (B then
has full column rank), so an upsampled patch yields the token of the original one. The map from
w to w' is linear, so it is computed once per patch size (``pi_resize_matrix``, timm's
``resample_patch_embed`` applied to the basis kernels) and applied as one matrix product per step.

The patch LayerNorm of vit-pytorch's stem (``patch_norm=true``) normalises the raw pixels of each
patch; the norm of a resized patch is not the resized norm, so PI-resize is defined without it
(big_vision's stem is a kernel and a bias only): FlexiViT needs ``patch_norm=false``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from timm.layers import resample_patch_embed
from torch import nn

PATCHES = "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"


def pi_resize_matrix(old: int, new: int) -> torch.Tensor:
    """(old^2, new^2): the flattened kernel of size ``old`` times it is its PI-resize to ``new``,
    with a bilinear resize without antialiasing (big_vision's ``tf.image.resize(..., "bilinear")``)."""
    basis = torch.eye(old * old).reshape(old * old, 1, old, old)
    resized = resample_patch_embed(basis, [new, new], interpolation="bilinear", antialias=False)
    return resized.reshape(old * old, new * new).float()


class PatchEmbedding(nn.Sequential):
    """(batch, channels, H, W) -> (batch, patches, dim). An ``nn.Sequential`` so that its
    parameters keep vit-pytorch's names (``to_patch_embedding.{1,2,3}``); slot 1 is the patch
    LayerNorm or, with ``patch_norm=False``, nothing. ``flexi_sizes``: the other patch sizes it is
    run at, whose resize matrices are built once (non-persistent buffers)."""

    def __init__(self, patch_size: int, channels: int, dim: int, patch_norm: bool = True,
                 flexi_sizes: tuple[int, ...] = ()):
        patch_dim = channels * patch_size * patch_size
        super().__init__(
            Rearrange(PATCHES, p1=patch_size, p2=patch_size),
            nn.LayerNorm(patch_dim) if patch_norm else nn.Identity(),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.patch_size, self.channels, self.patch_norm = patch_size, channels, patch_norm
        for size in flexi_sizes:
            if size != patch_size:
                self.register_buffer(f"pi_resize_{size}", pi_resize_matrix(patch_size, size), persistent=False)

    def resized_weight(self, size: int) -> torch.Tensor:
        """The Linear's weight PI-resized to patches of ``size`` (same pixel order: p1 p2 c)."""
        matrix = getattr(self, f"pi_resize_{size}", None)
        weight = self[2].weight
        if matrix is None:
            matrix = pi_resize_matrix(self.patch_size, size).to(weight.device)
        kernel = rearrange(weight, "d (p1 p2 c) -> d c (p1 p2)", p1=self.patch_size, p2=self.patch_size)
        return rearrange(kernel @ matrix.to(weight.dtype), "d c (p1 p2) -> d (p1 p2 c)", p1=size, p2=size)

    def forward(self, img: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        if patch_size is None or patch_size == self.patch_size:
            return super().forward(img)
        if self.patch_norm:
            raise ValueError(f"patch size {patch_size} needs patch_norm=False: PI-resize is defined for the "
                             f"embedding kernel alone (the model's patch size is {self.patch_size}).")
        x = rearrange(img, PATCHES, p1=patch_size, p2=patch_size)
        return self[3](F.linear(x, self.resized_weight(patch_size), self[2].bias))


__all__ = ["PatchEmbedding", "pi_resize_matrix"]
