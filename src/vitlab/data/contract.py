"""What vitlab asks of a datamodule, its own or a user's (``data._target_: my_pkg.MyData``).

A datamodule is a ``LightningDataModule`` whose loaders give ``(images, labels)`` batches, images
float ``(N, channels, image_size, image_size)`` as the network reads them (normalised) and labels
int64 class indices ``(N,)`` or class probabilities ``(N, num_classes)`` (MixUp), after its
``on_after_batch_transfer``. Beside its loaders, vitlab reads (README, "Your own model, data and
experiments"):

- ``image_size``, ``channels``, ``num_classes``: the shape the network is built for (the data
  config holds the same three fields, which the model config reads as ``${data.image_size}``, ...);
  the run records parameters, FLOPs and budgets at this shape;
- ``class_names``: a name per class, written into every checkpoint (``vitlab.predict`` writes them);
- ``state_dict()`` / ``load_state_dict()``: where in the epoch training stands, saved in every
  checkpoint, so that a run resumed in the middle of an epoch reads the batches an uninterrupted
  one would (optional: without it Lightning restarts the loader, and the rest of a resumed epoch
  comes from the start of a new pass);
- ``mean``, ``std``: the normalisation statistics per channel, written into checkpoints for
  ``vitlab.predict`` (optional);
- with the probes on (``probe.every_n_epochs``): ``normalize(uint8 images)``, ``eval_batch_size``
  and a ``train_set`` of ``vitlab.data.InMemoryImages`` after ``setup("fit")``.

``check_data_config`` and ``check_datamodule`` refuse, before training, a datamodule that lacks
a required part, in one line naming it and the fix. Every datamodule of ``vitlab.data`` (a subclass
of ``InMemoryImageDataModule``) has all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

#: Where a user reads the contract, named by every message.
README = "README, 'Your own model, data and experiments'"
#: The data config's fields that the model configs read (``${data.image_size}``, ...).
CONFIG_FIELDS = ("image_size", "channels", "num_classes")
#: The loaders a training run calls: fit validates every epoch (the checkpoints keep the best
#: ``val/acc``), and the best checkpoint is tested unless ``test=false``.
LOADERS = ("train_dataloader", "val_dataloader")


def _name(datamodule: Any) -> str:
    return f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"


def check_data_config(cfg: Mapping[str, Any]) -> None:
    """The run's data config has the fields the model config reads (a missing one would otherwise
    surface as an interpolation error inside the model config), and ``batch_size`` where a compute
    budget counts the images of a step."""
    data = cfg.get("data") or {}
    budget = cfg.get("budget") or {}
    wanted = [*CONFIG_FIELDS, *(("batch_size",) if budget.get("flops") or budget.get("minutes") else ())]
    missing = [field for field in wanted if field not in data]
    if missing:
        target = data.get("_target_", "the data config")
        raise ValueError(f"data ({target}) has no {', '.join(missing)}: the model config reads "
                         f"${{data.image_size}}, ${{data.channels}} and ${{data.num_classes}}, and a budget "
                         f"data.batch_size; add {', '.join(f'{field}: <value>' for field in missing)} to its YAML "
                         f"({README}).")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_datamodule(datamodule: Any, data: Mapping[str, Any], test: bool = True, probes: bool = False) -> None:
    """Refuse, in one line, a datamodule without what a training run reads (the module docstring);
    log one line for the optional parts it lacks. ``data``: its resolved config, whose
    ``image_size``, ``channels`` and ``num_classes`` the network is built with."""
    name = _name(datamodule)
    if not isinstance(datamodule, L.LightningDataModule):
        raise ValueError(f"data._target_={name} is not a LightningDataModule: subclass lightning.LightningDataModule "
                         f"(or vitlab.data.InMemoryImageDataModule) ({README}).")
    loaders = [*LOADERS, *(("test_dataloader",) if test else ())]
    for loader in loaders:
        if getattr(type(datamodule), loader) is getattr(L.LightningDataModule, loader):
            fix = " (or set test=false)" if loader == "test_dataloader" else ""
            raise ValueError(f"data._target_={name} has no {loader}(): define it{fix} ({README}).")
    for field in CONFIG_FIELDS:
        if not hasattr(datamodule, field):
            raise ValueError(f"data._target_={name} has no {field}: set self.{field} in its __init__ (the data "
                             f"config's {field}, {data.get(field)}) ({README}).")
        value = getattr(datamodule, field)
        if not _positive_int(value):
            raise ValueError(f"data._target_={name} has {field}={value!r}: it must be a positive int ({README}).")
        if value != data.get(field):
            raise ValueError(f"data._target_={name} has {field}={value} but its config data.{field}={data.get(field)}, "
                             f"which the model is built for: make them the same (pass data.{field} to the "
                             f"datamodule).")
    names = getattr(datamodule, "class_names", None)
    if names is None or isinstance(names, (str, bytes)) or not isinstance(names, Sequence) \
            or len(names) != datamodule.num_classes:
        have = "none" if names is None else f"{names!r}"[:80]
        raise ValueError(f"data._target_={name} needs class_names, a list of its {datamodule.num_classes} class "
                         f"names (checkpoints keep them for vitlab.predict), not {have}: set self.class_names in its "
                         f"__init__, e.g. [str(i) for i in range(num_classes)] ({README}).")
    if probes:
        for field in ("normalize", "eval_batch_size", "train_set"):
            if not hasattr(datamodule, field):
                raise ValueError(f"probe.every_n_epochs: the probes read the training split unaugmented through "
                                 f"normalize(), eval_batch_size and train_set (an InMemoryImages after setup('fit')), "
                                 f"and data._target_={name} has no {field}: subclass "
                                 f"vitlab.data.InMemoryImageDataModule, or set probe.every_n_epochs=null.")
    lacks = []
    if type(datamodule).state_dict is L.LightningDataModule.state_dict:
        lacks.append("state_dict()/load_state_dict() (a run resumed in the middle of an epoch reads the rest of it "
                     "from a restarted loader, not the batches an uninterrupted run would)")
    if not (hasattr(datamodule, "mean") and hasattr(datamodule, "std")):
        lacks.append("mean and std (checkpoints carry no normalisation: vitlab.predict needs them)")
    if lacks:
        log.info(f"{name} has no {'; no '.join(lacks)} ({README}).")


__all__ = ["CONFIG_FIELDS", "check_data_config", "check_datamodule"]
