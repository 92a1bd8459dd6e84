"""Checkpoints that are safe to open, checked before use, and describe themselves.

- Opening never unpickles code: files are read with ``torch.load(weights_only=True)`` (tensors,
  containers and plain values only) before Lightning sees them, and Lightning is told the same
  (``weights_only=True`` in ``fit`` and ``test``), so a tampered file is refused before
  anything in it runs. Eval and predict load weights through here only.
- ``ckpt_path`` is checked before training: it exists, it is a checkpoint, and it comes from
  a model with the same configuration as the one being built (mismatching fields are named).
- ``RunInfo`` adds what eval and predict need to every checkpoint (the model and data
  config, class names, normalisation statistics); ``vitlab.callbacks.RNGState`` adds the random
  generators' states.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from vitlab import tracking
from vitlab.errors import CheckpointError, UnsafeCheckpointError, first_line

#: Key of the run's own description inside a checkpoint.
RUN_INFO_KEY = "vitlab"
#: Model fields that may differ between a checkpoint and the model it is loaded into: how the
#: network runs (kernel, compilation), how it was initialised, training-only regularisers,
#: FlexiViT's patch sizes (any patch size can be read from the same weights) and where the patches
#: of another image size lie (``positions``).
FREE_FIELDS = frozenset({"attention", "compile", "head_init", "dropout", "drop_path", "patch_dropout",
                         "flexi_patch_sizes", "positions"})


def load_checkpoint(path: str | Path, name: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict of tensors and plain values, without running code.

    Tensors are memory-mapped, so checking a large checkpoint reads little of it. ``name`` is
    how the path is called in messages (the config field it came from).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{name}={path} does not exist: pass the path of a .ckpt file "
                                f"(a run keeps its checkpoints in <run folder>/checkpoints/).")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.ckpt"))
        hint = f"one of {found}" if found else "a .ckpt file"
        raise CheckpointError(f"{name}={path} is a folder: pass {hint} inside it.")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{name}={path} is not a PyTorch checkpoint (not the zip archive torch.save writes; "
                              f"it may be truncated or another kind of file): pass a .ckpt written by vitlab.train.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        # torch names the forbidden import, e.g. "unsupported GLOBAL posix.system".
        lines = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        detail = lines[0] if lines else "objects other than tensors"
        raise UnsafeCheckpointError(f"{name}={path} was refused: it holds code to run when loaded ({detail}), which a "
                                    f"checkpoint written by vitlab.train never does. Use a checkpoint from a source "
                                    f"you trust.") from None
    except (RuntimeError, EOFError, KeyError, ValueError) as err:
        raise CheckpointError(f"{name}={path} is a damaged checkpoint ({first_line(err)}): use another one, "
                              f"e.g. last.ckpt.") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(f"{name}={path} holds no model weights (no state_dict): it is not a Lightning "
                              f"checkpoint.")
    return checkpoint


def run_config(checkpoint: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The run's description: stored in the checkpoint by ``RunInfo`` or, for checkpoints without
    it, read from the ``config.yaml`` of the run folder the checkpoint sits in."""
    info = checkpoint.get(RUN_INFO_KEY)
    if isinstance(info, Mapping):
        return dict(info)
    path = Path(path).expanduser().resolve()
    for folder in (path.parent, path.parent.parent):
        config = folder / "config.yaml"
        if config.is_file():
            saved = OmegaConf.to_container(OmegaConf.load(config))
            return {"model": saved.get("model"), "data": saved.get("data")}
    return {}


def config_mismatches(saved: Mapping[str, Any] | None, current: Mapping[str, Any], prefix: str = "model") -> list[str]:
    """``"model.dim: checkpoint 128, config 64"`` for each field set on both sides that differs
    (``FREE_FIELDS`` excluded; a field only one side has is newer than the other's code, and the
    weights' shapes are checked as well)."""
    if not saved:
        return []
    keys = sorted((set(saved) & set(current)) - FREE_FIELDS)
    return [f"{prefix}.{key}: checkpoint {saved[key]}, config {current[key]}"
            for key in keys if saved[key] != current[key]]


def state_dict_mismatches(saved: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> list[str]:
    """Weights missing on either side or of another shape."""
    problems = [f"{k}: checkpoint {tuple(saved[k].shape)}, model {tuple(current[k].shape)}"
                for k in current if k in saved and tuple(saved[k].shape) != tuple(current[k].shape)]
    for where, keys in (("missing in the checkpoint", [k for k in current if k not in saved]),
                        ("not in the model", [k for k in saved if k not in current])):
        if keys:
            problems.append(f"{where}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    return problems


def check_compatible(checkpoint: Mapping[str, Any], path: str | Path, model_cfg: DictConfig | Mapping,
                     module: torch.nn.Module, name: str = "ckpt_path", fix: str | None = None) -> None:
    """Raise ``CheckpointError`` naming the fields in which the checkpoint's model differs from
    the configured one (its saved config first, else the weights' names and shapes)."""
    current = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    problems = (config_mismatches(run_config(checkpoint, path).get("model"), current)
                or state_dict_mismatches(checkpoint["state_dict"], module.state_dict()))
    if problems:
        fix = fix or ("set these fields to the checkpoint's values (see config.yaml in its run folder) "
                      "or use another checkpoint")
        raise CheckpointError(f"{name}={path} comes from a model with a different configuration: "
                              f"{'; '.join(problems)}. {fix.capitalize()}.")


def trusted_prefixes(trusted: Any = ()) -> tuple[str, ...]:
    """vitlab's own classes and those of the packages the user trusts (``trusted_targets=[my_lab.]``;
    a name without its final dot gets one, so ``my_lab`` never also allows ``my_lab_evil``)."""
    extra = [str(t) if str(t).endswith(".") else f"{t}." for t in (trusted or ())]
    return ("vitlab.", *extra)


def check_targets(node: Any, where: str, allowed: tuple[str, ...] = ("vitlab.",)) -> None:
    """A config read from a checkpoint may only name vitlab's own classes: instantiating an
    arbitrary ``_target_`` from a file would run whatever it names."""
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(allowed):
            package = str(target).split(".", 1)[0]
            raise UnsafeCheckpointError(f"{where} names _target_={target}, outside {', '.join(allowed)}: refused "
                                        f"(building it could run any code). If you trust the file (your own model "
                                        f"or data), allow its package: trusted_targets=[{package}.]")
        for key, value in node.items():
            check_targets(value, f"{where}.{key}" if key != "_target_" else where, allowed)
    elif isinstance(node, (list, tuple)):
        for value in node:
            check_targets(value, where, allowed)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


class RunInfo(L.Callback):
    """Writes the run's description into every checkpoint: ``checkpoint["vitlab"]`` holds the
    resolved ``model`` and ``data`` config, the class names, the normalisation statistics and
    the image shape, what ``vitlab.eval`` and ``vitlab.predict`` need, travelling with the file;
    and where the run is tracked (``vitlab.tracking.run_ids``), for eval's confusion matrix."""

    def __init__(self, cfg: DictConfig, datamodule: L.LightningDataModule):
        self.cfg = cfg
        self.datamodule = datamodule

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        dm = self.datamodule
        checkpoint[RUN_INFO_KEY] = {
            "model": _plain(self.cfg.get("model")),
            "data": _plain(self.cfg.get("data")),
            "classes": [str(c) for c in getattr(dm, "class_names", [])],
            "image_size": getattr(dm, "image_size", None),
            "channels": getattr(dm, "channels", None),
            # Streamed datasets evaluate at image_size / crop_pct then crop; predict does the same.
            "streaming": bool(getattr(dm, "streaming", False)),
            "mean": [float(v) for v in torch.as_tensor(dm.mean).flatten()] if hasattr(dm, "mean") else None,
            "std": [float(v) for v in torch.as_tensor(dm.std).flatten()] if hasattr(dm, "std") else None,
            "tracking": tracking.run_ids(trainer.loggers),
        }


def model_from_checkpoint(path: str | Path, name: str = "ckpt_path", test_hflip: bool | None = None,
                          test_image_sizes=(), test_patch_sizes=None, positions: str | None = None,
                          trusted: tuple[str, ...] = ()) -> tuple[L.LightningModule, dict[str, Any]]:
    """The LightningModule a checkpoint was trained as, with its weights, and the run's
    description (``RunInfo``). ``test_hflip`` overrides the run's own test-time flip
    (``module.test_hflip``); None keeps it. The test also reports the images resized to
    ``test_image_sizes`` and cut into patches of ``test_patch_sizes`` (None: the FlexiViT patch
    sizes the model trained at, if any), with the patches of those sizes placed by ``positions``
    (SimpleViT's field; None keeps the run's own). ``trusted``: packages (``"my_lab."``) whose
    classes the checkpoint may name besides vitlab's own (``trusted_targets``)."""
    from vitlab.config import instantiate_model, takes_argument
    from vitlab.module import ImageClassifier, check_test_variants

    checkpoint = load_checkpoint(path, name)
    info = run_config(checkpoint, path)
    model_cfg = info.get("model")
    if not isinstance(model_cfg, Mapping) or "_target_" not in model_cfg:
        raise CheckpointError(f"{name}={path} does not say which model it holds (no run description inside and no "
                              f"config.yaml in its run folder): keep it in its run folder (<run>/checkpoints/) "
                              f"beside the run's config.yaml.")
    check_targets(model_cfg, f"{name}={path}: model", trusted_prefixes(trusted))
    if positions is not None:
        from vitlab.models.position import POSITIONS

        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r} is not one of {', '.join(POSITIONS)} (null keeps the run's "
                             f"own).")
        if not takes_argument(model_cfg["_target_"], "positions"):
            raise ValueError(f"positions={positions} places the patches of vitlab's SimpleViT; {name}={path} holds "
                             f"{model_cfg['_target_']}: leave positions=null.")
        model_cfg = {**model_cfg, "positions": positions}
    net = instantiate_model(model_cfg)
    if test_hflip is None:
        # How the run tested (module.test_hflip) travels in Lightning's saved hyperparameters.
        test_hflip = (checkpoint.get("hyper_parameters") or {}).get("test_hflip", False)
    if test_patch_sizes is None:
        test_patch_sizes = model_cfg.get("flexi_patch_sizes") or ()
    check_test_variants(net, int(model_cfg["channels"]), test_image_sizes, test_patch_sizes,
                        settings=("image_sizes", "patch_sizes"))
    module = ImageClassifier(net=net, num_classes=int(model_cfg["num_classes"]), optimizer=None,
                             test_hflip=bool(test_hflip), test_image_sizes=test_image_sizes or (),
                             test_patch_sizes=test_patch_sizes)
    check_compatible(checkpoint, path, model_cfg, module, name)
    module.load_state_dict(checkpoint["state_dict"])
    return module, info
