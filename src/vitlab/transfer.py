"""Fine-tuning: start a new run from another run's weights (``init_from=<ckpt>``).

``ckpt_path`` resumes the same run and refuses any other model; ``init_from`` carries a trained
network to a new task, as the ViT paper's pre-train -> fine-tune protocol does:

- another number of classes (or ``init.head=reset``): a new head, zero-initialised (Beyer et
  al. 2022 and big_vision fine-tune from a zero head, so the first logits are all 0);
- another image size: a learned position embedding is resampled bicubically (the ViT paper's
  2-D interpolation, timm's ``resample_abs_pos_embed``); the fixed sincos table is computed for
  the new grid by the model itself, and rotary tables depend on no grid;
- another patch size: the patch embedding's kernel is PI-resized (FlexiViT, timm's
  ``resample_patch_embed``), which needs ``model.patch_norm=false`` on both sides.

Everything else (width, depth, heads, MLP, the switches) must match: the weights cannot be
carried to another shape. What was loaded, reset and resampled is returned for ``metrics.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from timm.layers import resample_abs_pos_embed
from torch import nn

from vitlab.checkpoint import FREE_FIELDS, load_checkpoint, run_config
from vitlab.errors import CheckpointError
from vitlab.models.patch_embed import pi_resize_matrix

log = logging.getLogger(__name__)

#: Model fields a fine-tuned model may set differently from its checkpoint's (besides
#: ``FREE_FIELDS``): what the weights are resized to, and the regularisers and initialisation
#: of the new run.
CARRIED_FIELDS = frozenset({"image_size", "patch_size", "num_classes", "head_init", "dropout", "drop_path"})
HEAD_CHOICES = ("reset", "keep")
#: SimpleViT's keys that are resized rather than copied.
POS_EMBEDDING = "pos_embedding"
PATCH_KERNEL = "to_patch_embedding.2.weight"


def classifier(net: nn.Module) -> nn.Module:
    """The network's classification head: timm's ``get_classifier()`` or SimpleViT's ``linear_head``."""
    if hasattr(net, "get_classifier"):
        return net.get_classifier()
    if isinstance(getattr(net, "linear_head", None), nn.Module):
        return net.linear_head
    raise ValueError(f"{type(net).__name__} has no classification head that vitlab can find (a get_classifier() "
                     f"method or a linear_head module): init.head, module.freeze and module.layer_decay need one.")


def head_parameter_names(net: nn.Module) -> set[str]:
    """Names (as in ``net.named_parameters()``) of the head's parameters."""
    head = classifier(net)
    prefix = next(name for name, module in net.named_modules() if module is head)
    return {name for name, _ in net.named_parameters() if name.startswith(f"{prefix}.") or name == prefix}


def network_state(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The network's weights in a vitlab checkpoint (the LightningModule's ``net.`` keys)."""
    return {key[len("net."):]: value for key, value in checkpoint["state_dict"].items() if key.startswith("net.")}


def _grid(tokens: int, name: str) -> int:
    side = round(tokens**0.5)
    if side * side != tokens:
        raise CheckpointError(f"{name}: a learned position embedding of {tokens} tokens is not a square grid, "
                              f"so it cannot be resampled.")
    return side


def init_from_checkpoint(net: nn.Module, path: str | Path, model_cfg: DictConfig | Mapping, head: str = "reset",
                         name: str = "init_from") -> dict[str, Any]:
    """Load the weights of the checkpoint at ``path`` into ``net`` (built from ``model_cfg``),
    resizing what a new image or patch size needs and with a new head if ``head="reset"`` or the
    classes differ. Returns the record: ``path``, ``loaded``, ``reset`` and ``resampled`` keys,
    and the checkpoint's ``from`` image size, patch size and classes."""
    if head not in HEAD_CHOICES:
        raise ValueError(f"init.head={head!r} is not one of {', '.join(HEAD_CHOICES)}: reset starts a new, "
                         f"zero-initialised head; keep loads the checkpoint's (same classes only).")
    checkpoint = load_checkpoint(path, name)
    saved_cfg = run_config(checkpoint, path).get("model") or {}
    current = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    fixed = sorted((set(saved_cfg) & set(current)) - FREE_FIELDS - CARRIED_FIELDS)
    problems = [f"model.{key}: checkpoint {saved_cfg[key]}, config {current[key]}"
                for key in fixed if saved_cfg[key] != current[key]]
    if problems:
        raise CheckpointError(f"{name}={path} cannot be carried to this model: {'; '.join(problems)}. Only "
                              f"image_size, patch_size and num_classes may differ: set the other fields to the "
                              f"checkpoint's values (its run folder's config.yaml).")
    state = network_state(checkpoint)
    if not state:
        raise CheckpointError(f"{name}={path} holds no vitlab network weights (no net.* keys in its state_dict): pass "
                              f"a checkpoint written by vitlab.train (<run>/checkpoints/*.ckpt).")
    target = net.state_dict()
    heads = head_parameter_names(net)
    loaded, reset, resampled, problems = [], [], {}, []
    new_state = {}
    for key, value in target.items():
        saved = state.get(key)
        if key in heads and head == "reset":
            # Zero weight and bias: every class starts at logit 0.
            new_state[key] = torch.zeros_like(value)
            reset.append(key)
            continue
        if key in heads and (saved is None or saved.shape != value.shape):
            was = "none" if saved is None else tuple(saved.shape)
            raise CheckpointError(f"init.head=keep, but {name}={path} has a head {key} of shape {was} and this "
                                  f"model one of {tuple(value.shape)} (another number of classes): use init.head=reset.")
        if saved is None:
            problems.append(f"{key} missing in the checkpoint")
            continue
        if saved.shape == value.shape:
            new_state[key] = saved
        elif key == POS_EMBEDDING and saved.ndim == 2 and saved.shape[1] == value.shape[1]:
            old, new = _grid(saved.shape[0], name), _grid(value.shape[0], "this model")
            new_state[key] = resample_abs_pos_embed(saved[None].float(), new_size=[new, new], old_size=[old, old],
                                                    num_prefix_tokens=0, interpolation="bicubic",
                                                    antialias=True)[0].to(value.dtype)
            resampled[key] = f"{old}x{old} -> {new}x{new} patches, bicubic"
        elif key == PATCH_KERNEL and saved.ndim == 2 and saved.shape[0] == value.shape[0]:
            channels = int(current.get("channels", 1))
            new_state[key] = pi_resize_kernel(saved, value.shape[1], channels, name, path)
            resampled[key] = (f"patch {round((saved.shape[1] / channels) ** 0.5)} -> "
                              f"{round((value.shape[1] / channels) ** 0.5)}, PI-resize")
        else:
            problems.append(f"{key}: checkpoint {tuple(saved.shape)}, model {tuple(value.shape)}")
            continue
        loaded.append(key)
    if problems:
        hint = (" The patch LayerNorm (model.patch_norm=true) is defined per patch size: fine-tuning at another "
                "patch size needs model.patch_norm=false on both runs." if any("to_patch_embedding.1" in p
                                                                               for p in problems) else "")
        raise CheckpointError(f"{name}={path} does not fit this model: {'; '.join(problems[:5])}"
                              f"{' ...' if len(problems) > 5 else ''}.{hint}")
    net.load_state_dict(new_state)
    record = {"path": str(Path(path).expanduser().resolve()), "head": head, "loaded": loaded, "reset": reset,
              "resampled": resampled,
              "from": {k: saved_cfg.get(k) for k in ("image_size", "patch_size", "num_classes")}}
    log.info(f"init_from: {len(loaded)} tensors loaded from {path}, {len(reset)} reset ({', '.join(reset) or '-'})"
             + "".join(f"; {key} resampled ({how})" for key, how in resampled.items()))
    return record


def pi_resize_kernel(weight: torch.Tensor, new_dim: int, channels: int, name: str, path) -> torch.Tensor:
    """The patch embedding's (dim, p*p*c) kernel PI-resized to (dim, q*q*c) (pixel order p1 p2 c)."""
    old, new = round((weight.shape[1] / channels) ** 0.5), round((new_dim / channels) ** 0.5)
    if old * old * channels != weight.shape[1] or new * new * channels != new_dim:
        raise CheckpointError(f"{name}={path}: a patch kernel of {weight.shape[1]} inputs is not {channels}-channel "
                              f"square patches.")
    # The same PI-resize as a FlexiViT model's own patch embedding (one matrix per pair of sizes).
    kernel = rearrange(weight.float(), "d (p1 p2 c) -> d c (p1 p2)", p1=old, p2=old)
    return rearrange(kernel @ pi_resize_matrix(old, new), "d c (p1 p2) -> d (p1 p2 c)", p1=new, p2=new).to(weight.dtype)


__all__ = ["init_from_checkpoint", "classifier", "head_parameter_names", "pi_resize_kernel"]
