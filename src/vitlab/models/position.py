"""Where a patch is: absolute position embeddings added to the patch tokens (fixed 2-D sincos,
learned, or none) and 2-D rotary embeddings applied to queries and keys (Heo et al. 2024).

Positions are counted in patches of the model's own patch size. A grid of another size is
placed by the model's ``positions``: ``extend`` puts patch (i, j) of patch size p at
(i, j) * p / patch_size, so a larger image reaches positions never trained (extrapolation);
``interpolate`` puts patch (i, j) of an h x w grid at (i * grid / h, j * grid / w), so every
image spans the trained grid (EVA-02's scheme, timm's ``ref_feat_shape``). For FlexiViT's other
patch sizes on the same image the two coincide. The fixed embeddings are evaluated at those
positions; a learned table is resampled bilinearly over the image either way (as big_vision's
FlexiViT and the ViT paper's fine-tuning at a new resolution do).
"""

from __future__ import annotations

import torch
from timm.layers import apply_keep_indices_nlc, freq_bands, resample_abs_pos_embed
from timm.layers.pos_embed_sincos import init_random_2d_freqs
from torch import nn

ABSOLUTE = ("sincos2d", "learned", "none")
ROTARY = ("rope2d_axial", "rope2d_mixed")
#: Base frequencies of the rotary embeddings, as the RoPE-ViT paper's models use them: 100 for
#: the fixed axial frequencies, 10 for the initial magnitudes of the learned mixed ones.
ROPE_THETA = {"rope2d_axial": 100.0, "rope2d_mixed": 10.0}
#: How the patches of a grid other than the model's own are placed (the module's docstring).
POSITIONS = ("extend", "interpolate")

Step = float | tuple[float, float]


def axis_steps(step: Step) -> tuple[float, float]:
    """The distance between neighbouring patches along (rows, columns), in the model's patches."""
    return (float(step), float(step)) if isinstance(step, (int, float)) else (float(step[0]), float(step[1]))


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0, step: Step = 1.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, shape (h * w, dim).

    A quarter of the channels each for sin(x), cos(x), sin(y), cos(y), with frequencies
    spaced geometrically from 1 to 1/temperature (Beyer et al. 2022, Sec. 2). ``step``: the
    distance between neighbouring patches, in the model's patches (one, or one per axis).
    """
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    step_y, step_x = axis_steps(step)
    if (step_y, step_x) != (1, 1):
        y, x = y * step_y, x * step_x
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1)
    omega = 1.0 / temperature**omega
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).float()


def parse_pos_emb(value: str) -> tuple[str, str | None]:
    """``"sincos2d+rope2d_axial"`` -> ("sincos2d", "rope2d_axial"); a rotary kind alone has no
    absolute part (``"rope2d_mixed"`` -> ("none", "rope2d_mixed"))."""
    parts = str(value).split("+")
    absolute = [p for p in parts if p in ABSOLUTE]
    rotary = [p for p in parts if p in ROTARY]
    if len(absolute) + len(rotary) != len(parts) or len(absolute) > 1 or len(rotary) > 1:
        raise ValueError(
            f"pos_emb={value!r} is not one of {', '.join(ABSOLUTE + ROTARY)}, nor one absolute and one rotary kind "
            f"joined by '+' (e.g. sincos2d+rope2d_axial)."
        )
    return (absolute[0] if absolute else "none"), (rotary[0] if rotary else None)


def absolute_position(kind: str, table: torch.Tensor | None, grid: int, h: int, w: int,
                      step: Step = 1.0) -> torch.Tensor | None:
    """The embedding added to the patch tokens of a grid of (h, w) patches spaced ``step`` model
    patches apart, from the model's ``table`` for its own (grid x grid) patches: that table itself
    on its own grid, the sincos embedding evaluated at the new positions, or the learned table
    resampled bilinearly (big_vision's FlexiViT: ``jax.image.resize(..., "linear")``)."""
    if table is None or (h == w == grid and axis_steps(step) == (1, 1)):
        return table
    if kind == "sincos2d":
        return posemb_sincos_2d(h, w, table.shape[-1], step=step).to(table.device)
    return resample_abs_pos_embed(table[None], new_size=[h, w], old_size=[grid, grid], num_prefix_tokens=0,
                                  interpolation="bilinear", antialias=False)[0]


class Rope2d(nn.Module):
    """2-D rotary position embedding of Heo et al. (2024): the rotations of every block.

    Each pair of a head's channels is rotated by the angle t_x f_x + t_y f_y of the token's
    position (t_x, t_y), so the score of two tokens depends on their offset only:

    - ``rope2d_axial`` (RoPE-Axial): fixed frequencies, half of the pairs turning with the row
      and half with the column at 100^(-k / (dim_head / 4)); the same table as timm's
      ``RotaryEmbeddingCat(dim_head, in_pixels=False, temperature=100)`` on a patch-index grid.
    - ``rope2d_mixed`` (RoPE-Mixed): learned frequencies (f_x, f_y) per block, head and pair,
      initialised as the paper and timm's ``RotaryEmbeddingMixed`` do (magnitudes
      10^(-4k / dim_head) in a random direction per head and block); the same table as timm's
      ``get_mixed_freqs`` of them.

    The angles are computed as timm's ``get_mixed_freqs`` computes them (axial = mixed
    frequencies fixed on the axes), in fp32. The forward gives each block its rotations as
    complex units e^(i angle), which ``rotate_pairs`` multiplies into the channel pairs of q and
    k; ``table`` gives the same rotations as timm's [sin, cos] table. Tokens without a position
    (class token, registers) get the identity rotation.
    """

    def __init__(self, kind: str, dim_head: int, heads: int, depth: int):
        super().__init__()
        self.kind, self.depth = kind, depth
        #: Fixed (axial) rotations by grid, step and device: built once, not at every forward.
        self._rotations: dict[tuple, torch.Tensor] = {}
        if kind == "rope2d_axial":
            bands = freq_bands(dim_head // 4, temperature=ROPE_THETA[kind], step=1)
            zeros = torch.zeros_like(bands)
            # (f_x, f_y) over the dim_head / 2 pairs: rows first, then columns (timm's order).
            freqs = torch.stack([torch.cat([zeros, bands]), torch.cat([bands, zeros])])
            self.register_buffer("freqs", freqs[:, None, None], persistent=False)  # (2, 1, 1, dim_head / 2)
        else:
            self.freqs = nn.Parameter(init_random_2d_freqs(dim_head, depth, heads, temperature=ROPE_THETA[kind]))

    def rotations(self, h: int, w: int, step: Step = 1.0) -> torch.Tensor:
        """(blocks or 1, heads or 1, h * w, dim_head / 2) complex: e^(i angle) of each channel pair,
        for patches in row-major order, ``step`` model patches apart (one, or one per axis)."""
        step_y, step_x = axis_steps(step)
        key = (h, w, step_y, step_x, self.freqs.device)
        if self.kind == "rope2d_axial" and key in self._rotations:
            return self._rotations[key]
        device = self.freqs.device
        t_y = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
        t_x = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
        if (step_y, step_x) != (1, 1):
            t_y, t_x = t_y * step_y, t_x * step_x
        freqs = self.freqs.float()
        angles = t_x[:, None] * freqs[0][..., None, :] + t_y[:, None] * freqs[1][..., None, :]
        rotations = torch.complex(angles.cos(), angles.sin())
        if self.kind == "rope2d_axial":
            self._rotations[key] = rotations
        return rotations

    def table(self, h: int, w: int, step: Step = 1.0) -> torch.Tensor:
        """The rotations as timm's table: (blocks or 1, heads or 1, h * w, 2 * dim_head), the sin
        then the cos of each pair's angle, each repeated for the pair's two channels."""
        rotations = self.rotations(h, w, step)
        return torch.cat([rotations.imag.repeat_interleave(2, -1), rotations.real.repeat_interleave(2, -1)], dim=-1)

    def forward(self, h: int, w: int, step: Step = 1.0, keep: torch.Tensor | None = None, prefix: int = 0,
                suffix: int = 0) -> list[torch.Tensor]:
        """The rotations of each block for the sequence [prefix tokens, patches (those in ``keep`` of
        each image, if given), suffix tokens], each broadcastable to (batch, heads, n, dim_head / 2)."""
        rotations = self.rotations(h, w, step)
        if keep is not None:
            rotations = apply_keep_indices_nlc(keep, rotations, keep)  # (batch, blocks, heads, kept, dim_head / 2)
        if prefix or suffix:
            pad = [rotations.new_ones(*rotations.shape[:-2], n, rotations.shape[-1]) for n in (prefix, suffix)]
            rotations = torch.cat([pad[0], rotations, pad[1]], dim=-2)  # 1 + 0i: no rotation
        per_block = (lambda i: rotations[:, i]) if keep is not None else (lambda i: rotations[i])
        return [per_block(i if rotations.shape[-4] > 1 else 0) for i in range(self.depth)]


def rotate_pairs(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (2k, 2k + 1) of ``x`` (..., n, dim_head) by the complex unit of
    ``rotations`` (..., n, dim_head / 2) from ``Rope2d``: one complex product in fp32, cast back to
    x's dtype. The same function as timm's ``apply_rot_embed_cat(x, Rope2d.table(...))``
    (x cos + rot(x) sin, ``tests/test_switches.py``) in one kernel forward and one backward: a
    training step of the default model with ``rope2d_mixed`` ran at 0.80x the model without RoPE in
    bf16 and 0.89x in fp32, against 0.57x and 0.73x with timm's (``scripts/bench_switches.py``)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


__all__ = ["ABSOLUTE", "POSITIONS", "ROTARY", "absolute_position", "axis_steps", "Rope2d", "parse_pos_emb",
           "posemb_sincos_2d", "rotate_pairs"]
