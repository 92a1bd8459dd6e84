"""Config helpers shared by the entry points: where the configs are, vitlab's OmegaConf
resolvers (registered by the entry points, ``register_resolvers``), and instantiation of the
model and of dict-of-objects groups (callbacks, loggers)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from vitlab.errors import failure_reason

#: The configs, shipped in the package (``conf/`` of the repository); entry points pass it to
#: ``hydra.main``, scripts to ``hydra.initialize_config_module``.
CONFIG_MODULE = "vitlab.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"


def auto_precision() -> str:
    """``bf16-mixed`` where bf16 matrix work is fast (CUDA, or a CPU with AVX512-BF16/AMX),
    else ``32-true``."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def class_folders(root: str | None) -> int | None:
    """Number of class folders in ``<root>/train`` (``${vitlab.class_folders:${data.root}}``), or
    null if it cannot be read: the image-folder datamodule then says what is wrong."""
    train = Path(str(root)).expanduser() / "train" if root else None
    if train is None or not train.is_dir():
        return None
    return sum(1 for entry in os.scandir(train) if entry.is_dir() and not entry.name.startswith(".")) or None


def shard_classes(root, storage_options=None):
    """Number of classes of the shards at ``root``, from their ``vitlab.json``
    (``${vitlab.shard_classes:${data.root},${data.storage_options}}``), or null if unreadable:
    the shards datamodule then says what is wrong."""
    from vitlab.data.shards import shard_classes as count

    return count(root, storage_options)


def first_set(*values):
    """The first value that is not null (``${vitlab.first:${name},default}``)."""
    return next((v for v in values if v is not None), None)


def threads_per_job(n_jobs: int) -> int:
    """Cores per job when ``n_jobs`` run side by side (joblib's -1: one job per core)."""
    cores = os.cpu_count() or 1
    return 1 if n_jobs <= 0 else max(1, cores // n_jobs)


def exact_div(a: int, b: int) -> int:
    """``a / b`` for integers that must divide (``${vitlab.div:${model.dim},${model.heads}}``)."""
    if b <= 0 or a % b:
        raise ValueError(f"{a} is not divisible by {b}: choose a divisor of {a}, e.g. {[d for d in range(1, a + 1) if a % d == 0]}.")
    return a // b


#: Overrides whose values are file paths. Sweep job folders are named ``<n>_<key>=<value>,...``,
#: and Hydra's override grammar would read the ``=`` and ``,`` of such a path as syntax.
PATH_OVERRIDES = ("ckpt_path", "input", "output", "data.root", "data.data_dir", "paths.data_dir")
_GRAMMAR_CHARS = set("=,[]{}()'\" \\")


def quote_path_overrides(argv: list[str]) -> list[str]:
    """Quote the values of path overrides (``ckpt_path=<sweep job>/checkpoints/last.ckpt``) so
    that a path which came out of a sweep can be passed as it is. A value already quoted, and
    any override in a multirun (where a comma may mean a sweep), is left alone."""
    if any(arg in ("-m", "--multirun") for arg in argv):
        return list(argv)
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in PATH_OVERRIDES and value[:1] not in ("'", '"') and _GRAMMAR_CHARS & set(value):
            # Hydra reads backslashes literally except before a quote (and the closing one).
            value = "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value) + "'"
            arg = f"{key}={value}"
        out.append(arg)
    return out


def register_resolvers() -> None:
    """Make ``${vitlab.*:...}`` known to OmegaConf; every entry point calls it before Hydra
    composes its config (importing this module registers nothing)."""
    from vitlab.sweep import job_dirname

    resolvers = (("vitlab.precision", auto_precision), ("vitlab.job_dirname", job_dirname), ("vitlab.first", first_set),
                 ("vitlab.threads_per_job", threads_per_job), ("vitlab.div", exact_div),
                 ("vitlab.class_folders", class_folders), ("vitlab.shard_classes", shard_classes))
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def instantiate_dict(node: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` of a dict-of-objects group; null entries
    (``callbacks.throughput=null``) are skipped."""
    if not node:
        return []
    return [hydra.utils.instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def instantiate_model(node: DictConfig | dict) -> torch.nn.Module:
    """The network of the ``model`` config. The model names its arguments (``patch_size=5``);
    here they become the config keys the user sets (``model.patch_size=5``)."""
    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as error:
        root = failure_reason(error)[0]
        if not isinstance(root, ValueError):
            raise
        fields = "|".join(re.escape(str(key)) for key in node if not str(key).startswith("_"))
        message = re.sub(rf"(?<![\w.])({fields})=", r"model.\1=", str(root)) if fields else str(root)
        if "image_size" in message:
            message += " (model.image_size follows data.image_size.)"
        raise ValueError(message) from None
