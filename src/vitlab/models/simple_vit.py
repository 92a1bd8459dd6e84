"""SimpleViT: the plain ViT of Beyer, Zhai & Kolesnikov (2022), "Better plain ViT baselines
for ImageNet-1k", and the design choices of the ViT papers since, each a switch that is off by
default (the default model is vit-pytorch's ``simple_vit.py``, key for key and logit for logit).

Patchify -> LayerNorm-Linear-LayerNorm embedding -> fixed 2-D sincos position embedding ->
pre-norm Transformer blocks -> final LayerNorm -> mean pooling -> linear head.

The switches, each a part built in ``__init__`` (none of them adds a checkpoint key when off):

- ``reg_tokens``: learned register tokens appended to the sequence, dropped before pooling
  (Darcet et al. 2024, *Vision Transformers Need Registers*);
- ``qk_norm``: LayerNorm of each head's queries and keys (Dehghani et al. 2023, ViT-22B);
- ``layer_scale``: a learned per-channel gain on each residual branch, starting at this value
  (Touvron et al. 2021, CaiT);
- ``pos_emb=rope2d_axial | rope2d_mixed`` (alone, or ``sincos2d+rope2d_axial``): 2-D rotary
  position embedding (Heo et al. 2024); ``positions=interpolate`` spreads a larger image's
  patches over the trained positions instead of extending them (EVA-02);
- ``mlp=swiglu``: the SwiGLU MLP at two thirds of ``mlp_dim`` (Shazeer 2020);
- ``patch_dropout``: in training, each image keeps a random share of its patches (Liu et al. 2023);
- ``pool=map``: multi-head attention pooling (Zhai et al. 2022);
- ``flexi_patch_sizes`` (with ``patch_norm=false``): FlexiViT (Beyer et al. 2023); the forward
  takes ``patch_size`` and PI-resizes the patch embedding to it.

Regularisers for longer or larger runs, also off by default: dropout on each residual branch,
stochastic depth (drop path), and a zero-initialised head.

Plain PyTorch on purpose: no Lightning, no Hydra. The constructor's keyword arguments are the
fields of the ``model`` config group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from vitlab.models.attention import ATTENTIONS, CPU_CHUNK_BYTES, Attention, chunked_attention, explicit_attention
from vitlab.models.parts import MLPS, MAPPool, PatchDropout, patch_tokens
from vitlab.models.patch_embed import PatchEmbedding
from vitlab.models.position import (ABSOLUTE, POSITIONS, ROTARY, Rope2d, absolute_position, parse_pos_emb,
                                    posemb_sincos_2d)

POOLS = ("mean", "cls", "map")
POS_EMBS = ABSOLUTE + ROTARY
HEAD_INITS = ("xavier", "zero")


class Transformer(nn.Module):
    def __init__(
        self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, attention: str,
        dropout: float = 0.0, drop_path: float = 0.0, qk_norm: bool = False, layer_scale: float | None = None,
        mlp: str = "gelu",
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, attention, dropout, qk_norm, layer_scale),
                           MLPS[mlp](dim, mlp_dim, dropout, layer_scale)])
            for _ in range(depth)
        )
        # Stochastic depth (Huang et al. 2016) per sample, its rate rising linearly from 0 at the
        # first block to `drop_path` at the last, as in DeiT (Touvron et al. 2021). A separate
        # list without parameters, so checkpoint keys do not depend on it.
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.drop_paths = nn.ModuleList(StochasticDepth(rate, mode="row") for rate in rates)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, rope: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        for i, ((attn, ff), drop_path) in enumerate(zip(self.layers, self.drop_paths)):
            x = drop_path(attn(x, rope[i] if rope is not None else None)) + x
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
        positions: str = "extend",
        attention: str = "auto",
        head_init: str = "xavier",
        dropout: float = 0.0,
        drop_path: float = 0.0,
        reg_tokens: int = 0,
        qk_norm: bool = False,
        layer_scale: float | None = None,
        mlp: str = "gelu",
        patch_dropout: float = 0.0,
        patch_norm: bool = True,
        flexi_patch_sizes: Sequence[int] | None = None,
    ):
        super().__init__()
        cfg = {key: value for key, value in locals().items() if key not in ("self", "__class__")}
        _validate(**cfg)
        grid = image_size // patch_size
        absolute, rotary = parse_pos_emb(pos_emb)
        self.patch_size = patch_size
        self.pool = pool
        self.pos_emb_kind = absolute
        #: Where the patches of another grid lie: ``vitlab.models.position``'s docstring.
        self.positions = positions
        self.head_init = head_init
        self.num_patches = grid * grid
        self.grid = grid
        #: FlexiViT: the patch sizes a training step draws from (``vitlab.module``), or None.
        self.flexi_patch_sizes = tuple(flexi_patch_sizes) if flexi_patch_sizes else None

        self.to_patch_embedding = PatchEmbedding(patch_size, channels, dim, patch_norm, self.flexi_patch_sizes or ())
        if absolute == "sincos2d":
            # Fixed, so a buffer built once; non-persistent keeps it out of checkpoints.
            self.register_buffer("pos_embedding", posemb_sincos_2d(grid, grid, dim), persistent=False)
        elif absolute == "learned":
            self.pos_embedding = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        else:
            self.pos_embedding = None
        self.rope = Rope2d(rotary, dim_head, heads, depth) if rotary else None
        self.patch_dropout = PatchDropout(patch_dropout) if patch_dropout > 0 else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.register_tokens = nn.Parameter(torch.zeros(reg_tokens, dim)) if reg_tokens else None

        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, attention, dropout, drop_path,
                                       qk_norm, layer_scale, mlp)
        self.map_pool = MAPPool(dim, heads, mlp_dim) if pool == "map" else None
        self.linear_head = nn.Linear(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deliberate initialisation as in big_vision's ViT: Xavier-uniform linear weights,
        # zero biases, LayerNorm at identity; class token and registers small normal.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for token in (self.cls_token, self.register_tokens):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        if self.head_init == "zero":
            # Beyer et al. 2022 (big_vision's head_zeroinit): every class starts at logit 0, so
            # the initial loss is exactly log(num_classes).
            nn.init.zeros_(self.linear_head.weight)

    def get_classifier(self) -> nn.Module:
        """The classification head (timm's name for it): what fine-tuning resets and a linear
        probe trains."""
        return self.linear_head

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameters by depth, in timm's convention (used by its layer-wise learning-rate decay):
        the embeddings (patch, position, class and register tokens, RoPE frequencies) first, then
        each block, the final norm with the last block; the rest (MAP head, linear head) last."""
        return {"stem": r"^to_patch_embedding|^pos_embedding|^cls_token|^register_tokens|^rope\.",
                "blocks": [(r"^transformer\.layers\.(\d+)\.", None), (r"^transformer\.norm\.", (99999,))]}

    def no_weight_decay(self) -> set[str]:
        """Parameter names that are embeddings (besides norms and biases, found by shape)."""
        names = {"pos_embedding", "cls_token", "register_tokens", "rope.freqs", "map_pool.latent"}
        return {name for name, _ in self.named_parameters() if name in names}

    def forward(self, img: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """Logits of (batch, channels, H, W) images whose sides the patch size divides: the
        model's own size, or (FlexiViT, and images of another size) any other."""
        return self.linear_head(self.features(img, patch_size))

    def features(self, img: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """The pooled (batch, dim) features the head reads (what the probes of frozen features
        classify)."""
        return self.pooled(*self.encode(img, patch_size))

    def encode(self, img: torch.Tensor, patch_size: int | None = None) -> tuple[torch.Tensor, int, int]:
        """The encoded sequence (batch, tokens, dim) after the final LayerNorm, laid out as
        [class token, patches, registers], and the number of tokens before and after the
        patches."""
        size = patch_size or self.patch_size
        h, w = img.shape[-2] // size, img.shape[-1] // size
        # How far apart the patches lie, in the model's own patches: by their pixels (extend), or
        # spread over the trained grid (interpolate; the same for another patch size alone).
        step = (self.grid / h, self.grid / w) if self.positions == "interpolate" else size / self.patch_size
        x = self.to_patch_embedding(img, size)
        pos = absolute_position(self.pos_emb_kind, self.pos_embedding, self.grid, h, w, step)
        if pos is not None:
            x = x + pos.to(x.dtype)
        keep = None
        if self.patch_dropout is not None:
            x, keep = self.patch_dropout(x)
        prefix, suffix = int(self.cls_token is not None), len(self.register_tokens) if self.register_tokens is not None else 0
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        if self.register_tokens is not None:
            x = torch.cat((x, self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype)), dim=1)
        rope = self.rope(h, w, step, keep, prefix, suffix) if self.rope is not None else None
        return self.transformer(x, rope), prefix, suffix

    def pooled(self, x: torch.Tensor, prefix: int, suffix: int) -> torch.Tensor:
        """(batch, dim) from the encoded sequence [class token, patches, registers]."""
        if self.pool == "cls":
            return x[:, 0]
        patches = patch_tokens(x, prefix, suffix)
        return self.map_pool(patches) if self.map_pool is not None else patches.mean(dim=1)


def _validate(**cfg) -> None:
    """Fail at construction, naming the offending arguments and the fix."""
    for name in ("image_size", "patch_size", "num_classes", "dim", "depth", "heads", "mlp_dim", "channels", "dim_head"):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    image_size, patch_size = cfg["image_size"], cfg["patch_size"]
    divisors = [d for d in range(1, image_size + 1) if image_size % d == 0]
    if image_size % patch_size:
        raise ValueError(
            f"patch_size={patch_size} does not divide image_size={image_size}: "
            f"choose a patch size from {divisors}, or images whose side is a multiple of {patch_size}."
        )
    for name, allowed in (("pool", POOLS), ("attention", ATTENTIONS), ("head_init", HEAD_INITS),
                          ("mlp", tuple(MLPS)), ("positions", POSITIONS)):
        if cfg[name] not in allowed:
            raise ValueError(f"{name}={cfg[name]!r} is not one of {', '.join(allowed)}.")
    absolute, rotary = parse_pos_emb(cfg["pos_emb"])
    if absolute == "sincos2d" and cfg["dim"] % 4:
        lower = cfg["dim"] - cfg["dim"] % 4
        raise ValueError(
            f"dim={cfg['dim']} is not a multiple of 4, which the 2-D sincos position "
            f"embedding needs: use dim={lower or 4} or {lower + 4}, or pos_emb=learned."
        )
    if rotary and cfg["dim_head"] % 4:
        lower = cfg["dim_head"] - cfg["dim_head"] % 4
        raise ValueError(
            f"pos_emb={cfg['pos_emb']} rotates pairs of channels by row and by column, so it needs a multiple of 4 "
            f"as dim_head={cfg['dim_head']}: use dim_head={lower or 4} or {lower + 4}."
        )
    if cfg["pool"] == "map" and cfg["dim"] % cfg["heads"]:
        raise ValueError(f"pool=map splits dim={cfg['dim']} over heads={cfg['heads']}, which does not divide it: "
                         f"choose heads from {[d for d in range(1, cfg['dim'] + 1) if cfg['dim'] % d == 0]}.")
    for name in ("dropout", "drop_path", "patch_dropout"):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(
                f"{name}={value!r} is not a probability in [0, 1): use 0 to turn it off, "
                f"or a rate such as {0.5 if name == 'patch_dropout' else 0.1}."
            )
    reg = cfg["reg_tokens"]
    if isinstance(reg, bool) or not isinstance(reg, int) or reg < 0:
        raise ValueError(f"reg_tokens={reg!r} must be a whole number of register tokens: 0 (off), or e.g. 4.")
    for name in ("qk_norm", "patch_norm"):
        if not isinstance(cfg[name], bool):
            raise ValueError(f"{name}={cfg[name]!r} must be true or false.")
    scale = cfg["layer_scale"]
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"layer_scale={scale!r} must be null (off) or the gains' positive initial value, e.g. 1e-5 "
                         f"(CaiT) or 0.1.")
    sizes = cfg["flexi_patch_sizes"]
    if sizes is None:
        return
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(f"flexi_patch_sizes={sizes!r} must be null (off) or a list of patch sizes, e.g. "
                         f"[{', '.join(str(d) for d in divisors if 1 < d < image_size)}].")
    bad = [s for s in sizes if image_size % s]
    if bad:
        raise ValueError(f"flexi_patch_sizes={list(sizes)}: {bad} do not divide image_size={image_size}: "
                         f"choose patch sizes from {divisors}.")
    if cfg["patch_norm"]:
        raise ValueError(f"flexi_patch_sizes={list(sizes)} needs patch_norm=false: PI-resize is defined for the "
                         f"patch embedding's kernel, not for a LayerNorm over each patch's pixels (big_vision's "
                         f"stem has none).")


__all__ = ["SimpleViT", "CPU_CHUNK_BYTES", "chunked_attention", "explicit_attention", "posemb_sincos_2d"]
