"""Config helpers shared by the entry points: where the configs are, vitlab's OmegaConf
resolvers (registered by the entry points, ``register_resolvers``), and instantiation of the
model and of dict-of-objects groups (callbacks, loggers)."""

from __future__ import annotations

import inspect
import logging
import os
import re
from pathlib import Path

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from vitlab.errors import close_matches, failure_reason

log = logging.getLogger(__name__)

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


def takes_argument(target: str | None, argument: str) -> bool:
    """Whether the constructor a model config's ``_target_`` names has this keyword argument. False
    for a target that cannot be imported (instantiating it then says why)."""
    try:
        return argument in inspect.signature(hydra.utils.get_object(str(target))).parameters
    except Exception:  # noqa: BLE001 - ImportError, a non-callable, a signature inspect cannot read
        return False


def takes_name(target: str | None) -> bool:
    """Whether the network's constructor has a ``name`` argument, as timm's ``create`` has; any
    other is built without ``model.name``."""
    return takes_argument(target, "name")


def keep_config_name(cfg: DictConfig) -> None:
    """``model.name`` names the network in summaries, HParams and trackers. A network built from a
    name (``model=timm``) reads it; for any other, a ``model.name=`` on the command line (as the
    SimpleViT job of ``-m model=simple_vit,timm model.name=deit_tiny_patch16_224`` gets) is set back
    to the name its own config gives, so that the run is not recorded under the timm name."""
    from hydra.core.hydra_config import HydraConfig

    model = cfg.get("model")
    if not isinstance(model, DictConfig) or "name" not in model or takes_name(model.get("_target_")):
        return
    hydra_cfg = HydraConfig.get()
    task = list(hydra_cfg.overrides.task)
    keep = [o for o in task if o.partition("=")[0].lstrip("+~") != "model.name"]
    if len(keep) == len(task):
        return
    try:  # the config composed again without the override (the same search path)
        searchpath = [o for o in hydra_cfg.overrides.hydra if o.partition("=")[0].lstrip("+~") == "hydra.searchpath"]
        own = hydra.compose(hydra_cfg.job.config_name, overrides=[*searchpath, *keep]).model.get("name")
    except Exception:  # noqa: BLE001 - outside a Hydra app (a test's composed config): the config group's name
        own = hydra_cfg.runtime.choices.get("model")
    if own is not None and own != model.name:
        log.info(f"model.name={model.name} names networks built from a name (model=timm); "
                 f"{str(model.get('_target_')).rsplit('.', 1)[-1]} takes none, so this run keeps its config's "
                 f"name, {own}.")
        model.name = own


#: What a hint of these types is called in a message; a field whose hint admits only these takes
#: no text.
_KINDS = {int: "an integer", float: "a number", bool: "true or false", type(None): "null"}


def _kinds(hint) -> list[str] | None:
    """What a parameter's type hint admits, as words (``["an integer", "null"]``), when it admits
    only numbers, booleans, None and tensors; None when it may admit text (``str``, a ``Literal``,
    a path, a class, ``Any``) or cannot be read."""
    import types
    import typing

    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not members or any(m not in _KINDS and m is not torch.Tensor for m in members):
        return None
    kinds = [_KINDS[m] for m in members if m in _KINDS]
    return [k for k in kinds if not (k == _KINDS[int] and _KINDS[float] in kinds)]


def check_value_types(cfg: DictConfig, sections: tuple[str, ...] = ("trainer", "optimizer", "scheduler", "module",
                                                                     "data")) -> None:
    """Refuse, before anything is built, text where a number belongs (``trainer.max_epochs=abc``,
    ``optimizer.lr=1e-3x``): each field of these sections' ``_target_`` whose type hint takes only
    numbers, booleans or null must not be a string, and ``seed`` must be an integer. Without this the
    value reaches Lightning or torch and fails deep inside, in a traceback that names neither."""
    import typing

    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r} must be an integer (seed=0).")
    for section in sections:
        node = cfg.get(section)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            target = hydra.utils.get_object(str(node._target_))
            # A class's own arguments first, then those of the bases its **kwargs reach.
            hints, names, open_ended = {}, set(), True
            for owner in (inspect.getmro(target) if inspect.isclass(target) else (target,)):
                function = owner.__init__ if inspect.isclass(owner) else owner
                hints = typing.get_type_hints(function) | hints
                parameters = inspect.signature(function).parameters.values()
                names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
                if not any(p.kind == p.VAR_KEYWORD for p in parameters):
                    open_ended = False
                    break
        except Exception:  # noqa: BLE001 - a target that cannot be imported or read: instantiating it says why
            continue
        unknown = [str(k) for k in node if not str(k).startswith("_") and str(k) not in names]
        if unknown and not open_ended:
            close = close_matches(unknown[0], sorted(names), f"{section}.")
            hint = f"did you mean {', '.join(close)}?" if close else \
                f"remove it (+{section}.{unknown[0]}=... adds a key the config does not have)"
            raise ValueError(f"{section}.{unknown[0]} is not an argument of {node._target_}: {hint}")
        for key, hint in hints.items():
            if key not in node or key.startswith("_") or OmegaConf.is_interpolation(node, key):
                continue  # an interpolation is resolved (and its errors told) where it is read
            value = node[key]
            kinds = _kinds(hint) if isinstance(value, str) else None
            if kinds:
                raise ValueError(f"{section}.{key}={value!r} must be {' or '.join(kinds)} "
                                 f"(the {key} of {node._target_}).")


def instantiate_model(node: DictConfig | dict) -> torch.nn.Module:
    """The network of the ``model`` config; ``name`` is passed only to a constructor that takes one
    (``takes_name``). The model names its arguments (``patch_size=5``); here they become the config
    keys the user sets (``model.patch_size=5``)."""
    if "name" in node and not takes_name(node.get("_target_")):
        node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        del node["name"]
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
