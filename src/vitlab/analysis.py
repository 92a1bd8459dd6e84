"""What a trained SimpleViT has learned, as numbers and figures (``python -m vitlab.analyze``).

The ViT paper's Figure 7 (Dosovitskiy et al. 2021), three panels:

- (a) the principal components of the patch-embedding filters: the rows of the Linear of
  ``to_patch_embedding`` reshaped to patch pixels. With ``patch_norm=true`` that Linear reads each
  patch's standardised pixels (zero mean, unit variance) scaled by the patch LayerNorm's gain, so
  the filter is the weight times the gain, and its component along the constant patch (which the
  LayerNorm removes) is dropped: only what the model can see is decomposed;
- (b) the cosine similarity of the position embedding of each patch with every other patch's
  (``plot_pos_emb_similarity``, also used by ``scripts/ablation_report.py``); for a rotary
  embedding, the similarity of the rotations: the cosine similarity of the vectors [sin, cos] of
  each patch's rotation angles, which is the mean over rotated channel pairs of
  cos(angle_i - angle_j), what a unit query-key pair scores when its key moves from patch i to j
  (heads concatenated; the learned mixed kind per block, first and last drawn); nothing for
  ``pos_emb=none``;
- (c) the mean attention distance of every head against depth: per head, the mean over patch
  queries of sum_j a_ij * d_ij, where d_ij is the pixel distance between the centres of patches i
  and j and a_ij the query's attention to the patches, renormalised over the patches (attention
  to the class token and registers, which have no position, is reported apart as
  ``attention_to_non_patch_tokens``); averaged over N test images.

Attention maps of a few test images (``plot_attention_maps``): the last block's attention
averaged over heads, and attention rollout (Abnar & Zuidema 2020) through all blocks, both seen
from the pooled token (``query_view``), and the norm of every output patch token (Darcet et al.
2024, Fig. 3: without registers a few patches reach several times the median norm).

Attention weights are read with ``vitlab.models.attention.recording_attention``; the model runs
in fp32 in eval mode. Plain torch, numpy and matplotlib (no pyplot: nothing global is left behind).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from vitlab.models.attention import recording_attention
from vitlab.models.parts import patch_tokens

#: How the attention maps are seen: ``cls`` reads the class token's row (``pool=cls``), ``patches``
#: the mean over the patch queries' rows (what mean pooling averages); ``auto`` picks by the pool.
QUERIES = ("auto", "cls", "patches")


# --------------------------------------------------------------------------- the model
def require_simple_vit(net: nn.Module, where: str = "the model") -> None:
    """Refuse, in one line, a network that lacks what the analysis reads (the patch embedding,
    vitlab's attention blocks, ``encode``)."""
    from vitlab.models import SimpleViT

    if not isinstance(net, SimpleViT):
        raise ValueError(f"{where} is a {type(net).__module__}.{type(net).__name__}, not vitlab's SimpleViT: the "
                         f"analysis reads the SimpleViT's patch embedding, attention blocks and encode(); train with "
                         f"model=simple_vit (or one of its sizes) to analyse a model.")


def model_summary(net: nn.Module) -> dict[str, Any]:
    """The facts every panel needs: patch size, grid, depth, heads, tokens before/after the patches."""
    blocks = net.transformer.layers
    return {"patch_size": int(net.patch_size), "grid": [int(net.grid), int(net.grid)], "depth": len(blocks),
            "heads": int(blocks[0][0].heads), "prefix_tokens": int(net.cls_token is not None),
            "register_tokens": len(net.register_tokens) if net.register_tokens is not None else 0,
            "pool": net.pool}


# --------------------------------------------------------------------------- (a) patch embedding
def patch_embedding_filters(net: nn.Module) -> tuple[np.ndarray, str]:
    """(dim, p, p, channels) filters of the patch embedding as the model applies them to a patch's
    pixels, and a sentence saying what they are."""
    embed = net.to_patch_embedding
    linear, norm = embed[2], embed[1]
    p, channels = embed.patch_size, embed.channels
    weight = linear.weight.detach().double().cpu()  # (dim, p * p * c), pixels in (p1 p2 c) order
    if isinstance(norm, nn.LayerNorm):
        weight = weight * norm.weight.detach().double().cpu()[None, :]
        weight = weight - weight.mean(dim=1, keepdim=True)  # the constant patch is normalised away
        note = ("Linear weight x patch LayerNorm gain (patch_norm=true: the filters read standardised pixels; their "
                "constant component, which the LayerNorm removes, is dropped)")
    else:
        note = "Linear weight (patch_norm=false: the filters read the normalised pixels directly)"
    return weight.reshape(-1, p, p, channels).numpy(), note


def principal_components(filters: np.ndarray, count: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` principal components of the filters (one filter per row once flattened),
    shaped like a filter, and the share of the filters' variance each explains. Each component's
    sign is fixed so that its largest entry is positive (SVD leaves it arbitrary)."""
    flat = filters.reshape(len(filters), -1)
    centred = flat - flat.mean(axis=0, keepdims=True)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    keep = int(min(count, int((variance > variance.sum() * 1e-10).sum()) if variance.sum() > 0 else 0))
    components = vt[:keep]
    signs = np.sign(components[np.arange(keep), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1, signs)[:, None]
    ratio = variance[:keep] / variance.sum() if variance.sum() > 0 else variance[:keep]
    return components.reshape(keep, *filters.shape[1:]), ratio


# --------------------------------------------------------------------------- (b) positions
def position_tables(net: nn.Module) -> tuple[dict[str, np.ndarray], str]:
    """``{label: (patches, features)}`` whose cosine similarities panel (b) draws, and a sentence
    saying what is drawn; empty for ``pos_emb=none``."""
    tables: dict[str, np.ndarray] = {}
    notes = []
    kind = net.pos_emb_kind
    if net.pos_embedding is not None:
        label = "sincos2d (fixed)" if kind == "sincos2d" else "learned"
        tables[label] = net.pos_embedding.detach().float().cpu().numpy()
        notes.append(f"{label}: the absolute embedding added to the patch tokens")
    if net.rope is not None:
        rope = net.rope.table(net.grid, net.grid).detach().float().cpu()  # (blocks|1, heads|1, n, 2 * dim_head)
        if net.rope.kind == "rope2d_axial":
            tables["rope2d_axial rotations"] = rope[0, 0].numpy()
        else:
            last = rope.shape[0] - 1
            for block in sorted({0, last}):
                per_head = rope[block].permute(1, 0, 2).reshape(rope.shape[2], -1)  # heads concatenated
                tables[f"rope2d_mixed rotations, block {block + 1}"] = per_head.numpy()
        notes.append(f"{net.rope.kind}: cosine similarity of each patch's [sin, cos] of its rotation angles = the mean "
                     f"over rotated channel pairs of cos(angle_i - angle_j)"
                     + (" (heads concatenated; first and last block)" if net.rope.kind == "rope2d_mixed" else ""))
    if not tables:
        notes.append("pos_emb=none: the model has no position embedding, nothing is drawn")
    return tables, "; ".join(notes)


def cosine_similarity(emb: np.ndarray) -> np.ndarray:
    """(n, n) cosine similarity of the rows of ``emb``."""
    emb = np.asarray(emb, dtype=np.float64)
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T


def draw_pos_emb_similarity(fig, embeddings: Mapping[str, np.ndarray], grid: tuple[int, int]) -> None:
    """Draw ``plot_pos_emb_similarity``'s panels into a matplotlib figure or subfigure."""
    rows, cols = grid
    for subfig, (label, emb) in zip(np.atleast_1d(fig.subfigures(1, len(embeddings))), embeddings.items()):
        similarity = cosine_similarity(emb)
        # One colour scale per embedding, from its lowest similarity to 1: the fixed sincos
        # embedding of a small grid varies over a narrow range that a -1..1 scale would hide.
        low = float(similarity.min())
        subfig.suptitle(f"{label} (colour scale {low:.2f} to 1)")
        axes = subfig.subplots(rows, cols, gridspec_kw={"wspace": 0.05, "hspace": 0.05})
        for index, ax in enumerate(np.asarray(axes).flat):
            image = ax.imshow(similarity[index].reshape(rows, cols), vmin=low, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
        subfig.colorbar(image, ax=subfig.axes, shrink=0.6, label="cosine similarity")


def plot_pos_emb_similarity(embeddings: dict[str, np.ndarray], grid: tuple[int, int], path: str | Path) -> Path:
    """Cosine similarity of each patch's position embedding with every other patch's, one
    panel per embedding (as in the ViT paper's Figure 7): panel (i, j) of a grid shows the
    similarity of patch (i, j) with all patches, laid out as the image.

    ``embeddings`` maps a label to an array of shape (rows * cols, dim), patches in row-major order.
    """
    fig = Figure(figsize=(5.2 * len(embeddings), 5.6), layout="constrained")
    fig.suptitle("position-embedding similarity: each tile is one patch's cosine similarity with all patches",
                 fontsize="medium")
    draw_pos_emb_similarity(fig, embeddings, grid)
    fig.savefig(path, dpi=100)
    return Path(path)


# --------------------------------------------------------------------------- (c) attention distance
def patch_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(n, n) pixel distance between the centres of every two patches of a (rows, cols) grid."""
    rows, cols = grid
    y, x = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    centres = torch.stack([y.flatten(), x.flatten()], dim=1) * patch_size
    return torch.cdist(centres, centres)


def attention_distance(weights: torch.Tensor, distances: torch.Tensor, prefix: int = 0,
                       suffix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention distance of one block's (batch, heads, n, n) weights, per image and head:
    (batch, heads) pixels, averaged over the patch queries; and the share of their attention that
    goes to the tokens without a position (class token, registers), (batch, heads)."""
    patches = weights[:, :, prefix: weights.shape[2] - suffix, prefix: weights.shape[3] - suffix].double()
    mass = patches.sum(dim=-1)  # (batch, heads, queries)
    to_patches = patches / mass.clamp_min(1e-12)[..., None]
    per_query = (to_patches * distances.to(patches.device)).sum(dim=-1)
    return per_query.mean(dim=-1), (1 - mass).mean(dim=-1)


# --------------------------------------------------------------------------- maps
def rollout(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) through all blocks: each block's weights averaged
    over heads, the identity added (the residual path) and rows renormalised, multiplied from the
    first block to the last; (batch, n, n) from per-block (batch, heads, n, n)."""
    result = None
    for weights in maps:
        mixed = weights.double().mean(dim=1)
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        result = mixed if result is None else mixed @ result
    if result is None:
        raise ValueError("rollout needs the attention of at least one block.")
    return result


def query_view(matrix: torch.Tensor, prefix: int, suffix: int, use_cls: bool) -> torch.Tensor:
    """(batch, patches) attention to each patch from a (batch, n, n) token-to-token matrix: the
    class token's row (``use_cls``) or the mean of the patch queries' rows; renormalised to sum 1
    over the patches."""
    end = matrix.shape[-1] - suffix
    rows = matrix[:, 0] if use_cls else matrix[:, prefix:end].mean(dim=1)
    view = rows[:, prefix:end]
    return view / view.sum(dim=-1, keepdim=True).clamp_min(1e-12)


@contextmanager
def recording_tokens(net: nn.Module):
    """Yields a list that receives the encoded sequence entering the final LayerNorm (the residual
    stream the token norms are measured on), once per forward."""
    seen: list[torch.Tensor] = []
    hook = net.transformer.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        hook.remove()


def output_token_norms(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(batch, patches) norms of the output patch tokens: the residual stream entering the final
    LayerNorm, class token and registers left out (Darcet et al. 2024, Fig. 3)."""
    with torch.no_grad(), recording_tokens(net) as seen:
        _, prefix, suffix = net.encode(images)
    return patch_tokens(seen[0], prefix, suffix).float().norm(dim=-1)


def norm_statistics(norms: torch.Tensor) -> dict[str, float]:
    """Median and largest token norm and their ratio (about 10 for the outliers of Darcet et al.)."""
    flat = norms.flatten().double()
    median, largest = float(flat.median()), float(flat.max())
    return {"median": median, "max": largest, "max_over_median": largest / median if median else float("nan")}


# --------------------------------------------------------------------------- the whole analysis
def analyse(net: nn.Module, distance_images: Callable[[], Any], picked: torch.Tensor, *, components: int = 28,
            query: str = "auto") -> dict[str, Any]:
    """The numbers behind every figure, for a SimpleViT in eval mode.

    ``distance_images``: a callable giving batches of normalised test images (the N images the
    attention distance and token norms are averaged over); ``picked``: the K normalised images
    whose maps are drawn. Returns plain lists (JSON-ready) plus a few arrays for the figures under
    keys starting with ``_``.
    """
    info = model_summary(net)
    grid, p = tuple(info["grid"]), info["patch_size"]
    device = next(net.parameters()).device
    distances = patch_distances(grid, p)
    uniform = float(distances.mean())
    if query not in QUERIES:
        raise ValueError(f"query={query!r} is not one of {', '.join(QUERIES)}.")
    use_cls = (query == "cls") or (query == "auto" and net.pool == "cls")
    if use_cls and net.cls_token is None:
        raise ValueError("query=cls needs a class token (model.pool=cls): use query=patches or query=auto.")

    filters, filter_note = patch_embedding_filters(net)
    pcs, ratio = principal_components(filters, components)
    tables, position_note = position_tables(net)

    depth, heads = info["depth"], info["heads"]
    total = torch.zeros(depth, heads, dtype=torch.float64)
    other = torch.zeros(depth, heads, dtype=torch.float64)
    norms, count = [], 0
    with torch.no_grad():
        for batch in distance_images():
            batch = batch.to(device)
            with recording_attention(net) as maps, recording_tokens(net) as seen:
                _, prefix, suffix = net.encode(batch)
            for block, weights in enumerate(maps):
                dist, share = attention_distance(weights, distances, prefix, suffix)
                total[block] += dist.sum(dim=0).cpu()
                other[block] += share.sum(dim=0).cpu()
            norms.append(patch_tokens(seen[0], prefix, suffix).float().norm(dim=-1).cpu())
            count += len(batch)
        if not count:
            raise ValueError("no test images to measure attention distance on: set images_for_distance to 1 or more.")
        per_head, non_patch = total / count, other / count
        all_norms = torch.cat(norms)

        picked = picked.to(device)
        with recording_attention(net) as maps, recording_tokens(net) as seen:
            tokens, prefix, suffix = net.encode(picked)
        logits = net.linear_head(net.pooled(tokens, prefix, suffix))
        last = query_view(maps[-1].double().mean(dim=1), prefix, suffix, use_cls)
        rolled = query_view(rollout(maps), prefix, suffix, use_cls)
        picked_norms = patch_tokens(seen[0], prefix, suffix).float().norm(dim=-1)

    def as_grid(values: torch.Tensor) -> np.ndarray:
        return values.reshape(len(values), *grid).cpu().double().numpy()

    view = ("the class token's row" if use_cls else "the mean over the patch queries' rows") + \
        " (renormalised over the patches)"
    if net.pool == "map":
        view += "; the MAP head's own attention is not drawn"
    per_block = per_head.mean(dim=1)
    return {
        "model": info,
        "patch_embedding": {
            "filters_shape": list(filters.shape), "note": filter_note, "components": (pcs.round(6) + 0.0).tolist(),
            "explained_variance_ratio": ratio.round(6).tolist(),
        },
        "position_embedding": {
            "kind": str(net.pos_emb_kind if net.rope is None else
                        (f"{net.pos_emb_kind}+{net.rope.kind}" if net.pos_embedding is not None else net.rope.kind)),
            "drawn": list(tables), "note": position_note,
            "similarity": {label: cosine_similarity(t).round(5).tolist() for label, t in tables.items()},
        },
        "attention_distance": {
            "images": count, "unit": "pixels", "per_head": (per_head.numpy().round(4) + 0.0).tolist(),
            "per_block": (per_block.numpy().round(4) + 0.0).tolist(), "mean": round(float(per_head.mean()), 4),
            "uniform_attention": round(uniform, 4),
            "attention_to_non_patch_tokens": (non_patch.numpy().round(4) + 0.0).tolist(),
        },
        "attention_maps": {
            "view": view, "last_block": as_grid(last).round(5).tolist(), "rollout": as_grid(rolled).round(5).tolist(),
            "token_norms": as_grid(picked_norms).round(4).tolist(),
            "predicted": logits.argmax(dim=-1).cpu().tolist(),
        },
        "token_norms": {"images": count, **{k: round(v, 4) for k, v in norm_statistics(all_norms).items()}},
        "_filters_pcs": pcs, "_tables": tables, "_all_norms": all_norms.numpy(),
    }


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """The scalars a sweep compares (``vitlab.results.load_runs(..., analysis=)`` columns)."""
    distance = result["attention_distance"]
    per_block = distance["per_block"]
    return {
        "mean_attention_distance": distance["mean"],
        "attention_distance_first_block": per_block[0],
        "attention_distance_last_block": per_block[-1],
        "attention_distance_per_block": per_block,
        "attention_to_non_patch_tokens": round(float(np.mean(distance["attention_to_non_patch_tokens"])), 4),
        "token_norm_max_over_median": result["token_norms"]["max_over_median"],
        "patch_embedding_top_pc_share": (result["patch_embedding"]["explained_variance_ratio"] or [None])[0],
    }


# --------------------------------------------------------------------------- figures
def _show_image(ax, image: np.ndarray) -> None:
    """(C, H, W) pixels in [0, 1]: grey for one channel, RGB for three."""
    ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def _components_panel(subfig, pcs: np.ndarray, ratio: Sequence[float], note: str) -> None:
    """The components as one mosaic of tiles, 7 to a row as in the paper, each on its own scale
    (grey from -max|x| to max|x| for one channel, min to max per component for RGB)."""
    count = len(pcs)
    subfig.suptitle(f"(a) first {count} principal components of the patch-embedding filters\n"
                    f"(share of the filters' variance above each)", fontsize="medium")
    ax = subfig.subplots()
    ax.set_xticks([])
    ax.set_yticks([])
    if not count:
        ax.text(0.5, 0.5, "the filters have no variance", ha="center", transform=ax.transAxes)
        return
    p, channels = pcs.shape[1], pcs.shape[-1]
    cols = min(7, count)
    rows = -(-count // cols)
    gap = max(1, p // 4)
    mosaic = np.ones((rows * (p + gap) - gap, cols * (p + gap) - gap, 3))
    for index, pc in enumerate(pcs):
        if channels == 1:
            bound = float(np.abs(pc).max()) or 1.0
            tile = np.repeat((pc / bound + 1) / 2, 3, axis=-1)
        else:
            low, high = float(pc.min()), float(pc.max())
            tile = (pc[..., :3] - low) / ((high - low) or 1.0)
        r, c = divmod(index, cols)
        mosaic[r * (p + gap): r * (p + gap) + p, c * (p + gap): c * (p + gap) + p] = tile
        ax.text(c * (p + gap) + (p - 1) / 2, r * (p + gap) - 0.6, f"{100 * ratio[index]:.0f}%", ha="center",
                va="bottom", fontsize="x-small")
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_ylim(mosaic.shape[0] - 0.5, -gap - 0.5)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_xlabel(note, fontsize="x-small", wrap=True)


def _position_panel(subfig, tables: Mapping[str, np.ndarray], grid: tuple[int, int], note: str) -> None:
    subfig.suptitle("(b) position-embedding similarity (each tile: one patch against all)", fontsize="medium")
    if not tables:
        subfig.text(0.5, 0.5, note, ha="center", va="center", wrap=True)
        return
    draw_pos_emb_similarity(subfig, tables, grid)
    subfig.supxlabel(note, fontsize="x-small", wrap=True)


def _distance_panel(ax, per_head: np.ndarray, uniform: float, images: int) -> None:
    depth, heads = per_head.shape
    for head in range(heads):
        ax.scatter(np.arange(1, depth + 1), per_head[:, head], s=18, label=f"head {head + 1}")
    ax.axhline(uniform, color="grey", linestyle="--", linewidth=1, label="uniform attention")
    ax.set(xlabel="network depth (block)", ylabel="mean attention distance (pixels)",
           title=f"(c) mean attention distance per head, {images} test images", xticks=range(1, depth + 1))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncols=2)


def plot_figure7(result: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """The ViT paper's Figure 7 for one model: (a) filters' principal components, (b) position
    similarity, (c) mean attention distance against depth."""
    tables = result["_tables"]
    fig = Figure(figsize=(6 + 5.4 * max(1, len(tables)) + 6, 6.2), layout="constrained")
    if title:
        fig.suptitle(title, fontsize="medium")
    left, middle, right = fig.subfigures(1, 3, width_ratios=[6, 5.4 * max(1, len(tables)), 6])
    _components_panel(left, result["_filters_pcs"], result["patch_embedding"]["explained_variance_ratio"],
                      result["patch_embedding"]["note"])
    _position_panel(middle, tables, tuple(result["model"]["grid"]), result["position_embedding"]["note"])
    distance = result["attention_distance"]
    _distance_panel(right.subplots(), np.asarray(distance["per_head"]), distance["uniform_attention"],
                    distance["images"])
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_attention_maps(result: Mapping[str, Any], images: np.ndarray, labels: Sequence[str],
                        path: str | Path, per_row: int = 10) -> Path:
    """One column per picked image: the image; the last block's attention and the rollout overlaid
    on it; the norms of its output patch tokens (one colour scale for all images)."""
    maps = result["attention_maps"]
    rows = [("last block, heads averaged", np.asarray(maps["last_block"]), "inferno"),
            ("rollout through all blocks", np.asarray(maps["rollout"]), "inferno"),
            ("output patch-token norm", np.asarray(maps["token_norms"]), "viridis")]
    top = float(np.asarray(maps["token_norms"]).max()) or 1.0
    count = len(images)
    chunks = [range(start, min(start + per_row, count)) for start in range(0, count, per_row)]
    fig = Figure(figsize=(1.7 * min(per_row, count) + 1.6, 6.6 * len(chunks)), layout="constrained")
    fig.suptitle(f"attention seen from {maps['view']}; registers: {result['model']['register_tokens']}",
                 fontsize="medium")
    for subfig, chunk in zip(np.atleast_1d(fig.subfigures(len(chunks), 1)), chunks):
        axes = np.asarray(subfig.subplots(4, per_row, squeeze=False))
        for col in range(per_row):
            if col >= len(chunk):
                for ax in axes[:, col]:
                    ax.axis("off")
                continue
            index = chunk[col]
            image = images[index]
            height, width = image.shape[-2:]
            _show_image(axes[0, col], image)
            axes[0, col].set_title(labels[index], fontsize="x-small")
            for row, (name, values, cmap) in enumerate(rows, start=1):
                ax = axes[row, col]
                if row < 3:
                    _show_image(ax, image)
                    shown = ax.imshow(values[index], cmap=cmap, alpha=0.55, interpolation="nearest",
                                      extent=(-0.5, width - 0.5, height - 0.5, -0.5))
                else:
                    shown = ax.imshow(values[index], cmap=cmap, vmin=0, vmax=top, interpolation="nearest")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ax.set_title(f"max/median {values[index].max() / max(np.median(values[index]), 1e-12):.1f}",
                                 fontsize="xx-small", pad=2)
                if col == 0:
                    ax.set_ylabel(name, fontsize="x-small")
            if col == len(chunk) - 1:
                subfig.colorbar(shown, ax=axes[3, :], shrink=0.8, label="norm")
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_token_norms(norms: np.ndarray, stats: Mapping[str, float], register_tokens: int, path: str | Path) -> Path:
    """Histogram of the output patch-token norms over the N test images (Darcet et al. Fig. 3)."""
    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.hist(np.asarray(norms).ravel(), bins=60, color="tab:blue")
    ax.set_yscale("log")
    ax.axvline(stats["median"], color="grey", linestyle="--", linewidth=1, label=f"median {stats['median']:.1f}")
    ax.set(xlabel="norm of an output patch token", ylabel="patch tokens (log)",
           title=f"{register_tokens} register tokens: max / median = {stats['max_over_median']:.2f}")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_distance_by_job(curves: Mapping[str, Sequence[float]], groups: Mapping[str, str], path: str | Path,
                         uniform: Mapping[str, float] | None = None) -> Path:
    """Mean attention distance (over heads) against depth, one line per job; jobs of one setting
    (their labels but the seed) share a colour. ``uniform``: each job's distance under uniform
    attention, drawn as a dashed line where the jobs share it."""
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    colours: dict[str, Any] = {}
    cycle = [f"C{i}" for i in range(10)]
    for label, values in curves.items():
        group = groups.get(label, label)
        colour = colours.setdefault(group, cycle[len(colours) % len(cycle)])
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", color=colour, label=label, alpha=0.85)
    references = set((uniform or {}).values())
    if len(references) == 1:
        ax.axhline(references.pop(), color="grey", linestyle="--", linewidth=1, label="uniform attention")
    ax.set(xlabel="network depth (block)", ylabel="mean attention distance (pixels, mean over heads)",
           title="mean attention distance per block, by job")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=100)
    return Path(path)


__all__ = ["QUERIES", "analyse", "attention_distance", "cosine_similarity", "draw_pos_emb_similarity",
           "model_summary", "norm_statistics", "output_token_norms", "patch_distances", "patch_embedding_filters",
           "plot_attention_maps", "plot_distance_by_job", "plot_figure7", "plot_pos_emb_similarity",
           "plot_token_norms", "position_tables", "principal_components", "query_view", "recording_tokens",
           "require_simple_vit", "rollout", "summary"]
