"""Probes of frozen features: how well the pooled features of a network classify images when
nothing more is trained but a classifier that needs no gradient steps.

Two probes, both fitted on training images and scored on the validation split:

- ``probe/knn_acc``: a weighted k-nearest-neighbour classifier as DINO (Caron et al. 2021)
  evaluates its features. Features are L2-normalised, so the dot product is the cosine
  similarity; each query takes the ``k`` (20) most similar images of the bank, and every
  neighbour votes for its class with the weight ``exp(similarity / T)``, ``T = 0.07`` (DINO's
  temperature: the closest neighbours dominate the vote). The bank: up to ``bank_size`` (10 000)
  training images, a seeded random subset when the split is larger, without augmentation.
- ``probe/fewshot_{n}shot``: a linear classifier fitted in closed form by ridge regression on
  ``n`` training images per class (1, 5, 10, 25), drawn from the bank, as big_vision's
  ``fewshot_lsr`` evaluator does: features standardised by the mean and standard deviation of
  the few-shot images, a constant bias feature of 100 (so the bias is all but unregularised),
  targets +1 for the class and -1 for the others, the regulariser fixed at 2^10 (big_vision's
  setting), the prediction the largest output. Each shot count is fitted on ``draws`` (3)
  seeded draws and the mean accuracy is logged; the n-shot images of a draw include its
  fewer-shot ones.

The functions take features and labels and return accuracies (``knn_accuracy``,
``ridge_accuracy``, ``fewshot_accuracies``, ``probe_scores``). ``FeatureProbe`` is the Lightning
callback that runs them after validation on the frozen network (evaluation mode, no gradients,
the run's precision): ``probe.every_n_epochs`` in training, ``probe=true`` in ``vitlab.eval``.
The network's pooled features are ``net.features(images)`` (``SimpleViT.features``: what the
linear head reads). For SimpleViT the validation features are the head's inputs, caught by a hook
while validation computes the logits, so only the bank costs extra forward passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

log = logging.getLogger(__name__)

#: The constant feature that carries the ridge classifier's bias (big_vision's value): large, so
#: its weight, the bias, is hardly shrunk by the regulariser.
BIAS_FEATURE = 100.0


# --- the classifiers: features in, accuracy out -------------------------------------------------


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """The class of each query (N, D) by a weighted vote of its ``k`` nearest bank features
    (M, D) in cosine similarity, each neighbour weighted ``exp(similarity / temperature)``.
    Ties between classes go to the lower class index."""
    bank = F.normalize(bank.float(), dim=1)
    labels = bank_labels.to(bank.device).long()
    k = min(k, len(bank))
    predictions = []
    for start in range(0, len(queries), chunk):
        query = F.normalize(queries[start: start + chunk].to(bank.device).float(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes, device=bank.device)
        votes.scatter_add_(1, labels[index], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long, device=bank.device)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Share of the queries whose weighted kNN vote (``knn_predict``) is their label."""
    predicted = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return (predicted.cpu() == query_labels.cpu()).double().mean().item()


def ridge_fit(train: torch.Tensor, labels: torch.Tensor, num_classes: int,
              l2_reg: float = 2.0**10) -> tuple[torch.Tensor, torch.Tensor]:
    """The ridge regression of targets +1 / -1 on ``train`` (N, D), in float64 on the CPU, as
    ``(weights (D, C), bias (C,))`` that score raw features: ``features @ weights + bias``.

    Fitted on the features standardised by the training points' mean and standard deviation,
    with a constant bias feature (``BIAS_FEATURE``): the weights of those are
    ``(X^T X + l2 I)^-1 X^T Y``, or the equal ``X^T (X X^T + l2 I)^-1 Y`` when there are fewer
    points than features (the smaller system is solved); the standardisation is then folded
    into the returned weights and bias."""
    x = train.detach().cpu().double()
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False) + 1e-5
    x = torch.cat([(x - mean) / std, x.new_full((len(x), 1), BIAS_FEATURE)], dim=1)
    y = 2.0 * F.one_hot(labels.cpu().long(), num_classes).double() - 1.0
    n, d = x.shape
    if n >= d:
        w = torch.linalg.solve(x.T @ x + l2_reg * torch.eye(d, dtype=x.dtype), x.T @ y)
    else:
        w = x.T @ torch.linalg.solve(x @ x.T + l2_reg * torch.eye(n, dtype=x.dtype), y)
    weights = w[:-1] / std[:, None]
    return weights, BIAS_FEATURE * w[-1] - mean @ weights


def ridge_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                   num_classes: int, l2_reg: float = 2.0**10) -> float:
    """Accuracy on ``test`` of the ridge classifier fitted on ``train`` (``ridge_fit``): the
    class of the largest output."""
    weights, bias = ridge_fit(train, train_labels, num_classes, l2_reg)
    predicted = (test.detach().cpu().double() @ weights + bias).argmax(dim=1)
    return (predicted == test_labels.cpu()).double().mean().item()


def fewshot_indices(labels: torch.Tensor, num_classes: int, shots: int, draw: int, seed: int) -> torch.Tensor:
    """Indices of ``shots`` points of each class (fewer where a class has fewer): the first of a
    shuffle of each class seeded by (``seed``, ``draw``), so a draw's larger shot counts
    contain its smaller ones, and every epoch and every run with this seed draws the same."""
    rng = np.random.default_rng([seed, draw])
    labels = labels.cpu().numpy()
    picks = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(num_classes)]
    return torch.from_numpy(np.concatenate(picks).astype(np.int64))


def fewshot_accuracies(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                       query_labels: torch.Tensor, num_classes: int, shots: Sequence[int] = (1, 5, 10, 25),
                       draws: int = 3, seed: int = 0, l2_reg: float = 2.0**10) -> dict[int, float]:
    """``{n: mean accuracy}`` of ridge classifiers (``ridge_accuracy``) fitted on ``n`` bank
    points per class, over ``draws`` seeded draws; classes absent from the bank are left out
    of the fit (and counted wrong)."""
    bank, bank_labels = bank.detach().cpu(), bank_labels.cpu()
    queries, query_labels = queries.detach().cpu().double(), query_labels.cpu()
    results = {}
    for n in shots:
        accuracies = [ridge_accuracy(bank[picks], bank_labels[picks], queries, query_labels, num_classes, l2_reg)
                      for picks in (fewshot_indices(bank_labels, num_classes, n, d, seed) for d in range(draws))]
        results[int(n)] = float(np.mean(accuracies))
    return results


def probe_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, shots: Sequence[int] = (1, 5, 10, 25),
                 draws: int = 3, seed: int = 0, l2_reg: float = 2.0**10) -> dict[str, float]:
    """Both probes, under the names they are logged as: ``probe/knn_acc`` and
    ``probe/fewshot_{n}shot``."""
    scores = {"probe/knn_acc": knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, k, temperature)}
    fewshot = fewshot_accuracies(bank, bank_labels, queries, query_labels, num_classes, shots, draws, seed, l2_reg)
    scores.update({f"probe/fewshot_{n}shot": value for n, value in fewshot.items()})
    return scores


# --- what the network and the data give the probes ---------------------------------------------


def check_features(net: nn.Module, setting: str, fix: str) -> None:
    """Refuse, before anything runs, a network without pooled features."""
    if not callable(getattr(net, "features", None)):
        raise ValueError(f"{setting} probes the pooled features of the network, but {type(net).__name__} has no "
                         f"features(images) method returning (batch, dim): add one (as vitlab.models.SimpleViT has), "
                         f"or {fix}.")


def bank_indices(size: int, bank_size: int, seed: int) -> torch.Tensor:
    """All of ``size`` items in order, or a seeded random ``bank_size`` of them, sorted."""
    if size <= bank_size:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:bank_size].sort().values


def unaugmented_train_set(datamodule) -> Dataset:
    """The training split as evaluation reads images (no augmentation): in memory, the
    datamodule's own ``InMemoryImages``; streamed, the same files or shards read with the
    evaluation transform."""
    from vitlab.data import InMemoryImages

    if datamodule.train_set is None:
        datamodule.setup("fit")
    train = datamodule.train_set
    if isinstance(train, InMemoryImages):
        return train
    from vitlab.data.imagefolder import ImageFileDataset, ImageFolderDataModule

    if isinstance(datamodule, ImageFolderDataModule):
        return ImageFileDataset(datamodule.files["train"], datamodule.channels, datamodule.eval_transform,
                                datamodule.on_bad_file)
    from vitlab.data.shards import ShardsDataModule

    if isinstance(datamodule, ShardsDataModule):
        return datamodule._dataset("train", train=False, transform=datamodule.eval_transform)
    raise ValueError(f"the probes read training images without augmentation, which {type(datamodule).__name__} "
                     f"does not offer: use a dataset of vitlab.data, or leave the probes off.")


def bank_images(datamodule, bank_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``bank_size`` training images (uint8, as the datamodule reads them before
    normalisation) and their labels: a seeded random subset when the split is larger."""
    from vitlab.data import InMemoryImages
    from vitlab.data.loading import collate_samples

    dataset = unaugmented_train_set(datamodule)
    picks = bank_indices(len(dataset), bank_size, seed)
    if isinstance(dataset, InMemoryImages):
        return dataset.images[picks], dataset.labels[picks]
    from vitlab.data.imagefolder import ImageFileDataset

    # Read once, by the datamodule's workers for image files (shards are read here, by index).
    workers = datamodule.num_workers if isinstance(dataset, ImageFileDataset) else 0
    loader = DataLoader(Subset(dataset, picks.tolist()), batch_size=datamodule.eval_batch_size,
                        num_workers=workers, collate_fn=collate_samples)
    images, labels = zip(*((batch[0], batch[1]) for batch in loader))
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def extract_features(net: nn.Module, images: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor],
                     device: torch.device, batch_size: int, context: Callable = nullcontext) -> torch.Tensor:
    """``net.features`` of uint8 images (N, C, H, W), in batches on ``device`` under ``context``
    (the run's autocast), as float32 (N, D) on that device."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = normalize(images[start: start + batch_size].to(device, non_blocking=True))
        with context():
            out.append(net.features(batch).float())
    return torch.cat(out)


def _head_input_hookable(pl_module: L.LightningModule) -> bool:
    """Whether validation's logits come from ``net.linear_head(net.features(x))`` in eager mode,
    so a hook on the head's input sees the pooled features (SimpleViT, not compiled)."""
    from vitlab.models import SimpleViT
    from vitlab.module import ImageClassifier

    net = getattr(pl_module, "net", None)
    compiled = getattr(net, "_compiled_call_impl", None) is not None
    return isinstance(pl_module, ImageClassifier) and isinstance(net, SimpleViT) and not compiled


def _gather(trainer: L.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """The rows of every process, concatenated in rank order (they may hold different numbers)."""
    if trainer.world_size <= 1:
        return tensor
    sizes = trainer.strategy.all_gather(torch.tensor([len(tensor)], device=tensor.device)).flatten().tolist()
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    gathered = trainer.strategy.all_gather(padded)
    return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])


class FeatureProbe(L.Callback):
    """Runs the kNN and few-shot probes after validation, on the network as validation left it
    (evaluation mode; with an EMA callback, the averaged weights), every ``every_n_epochs``
    epochs and at the last validation of a fit, or at every ``trainer.validate``. Logged with
    ``pl_module.log`` (every tracker, and ``metrics.json``'s history and top level through the
    run's record); ``results`` keeps the last scores.

    Validation features: the input of ``net.linear_head``, caught by a forward pre-hook while
    validation runs (SimpleViT in eager mode), else ``net.features`` on each validation batch.
    Bank features: ``net.features`` of the bank's images at the start of validation, under the
    run's precision. Under DDP each process embeds a share of the bank and its validation
    batches, and all of them score the gathered features."""

    def __init__(self, net: nn.Module | None = None, every_n_epochs: int | None = 1, bank_size: int = 10_000,
                 k: int = 20, temperature: float = 0.07, shots: Sequence[int] = (1, 5, 10, 25), draws: int = 3,
                 l2_reg: float = 2.0**10, seed: int = 0, prefix: str = "probe", setting: str | None = None,
                 fix: str = "set probe.every_n_epochs=null"):
        _check_settings(prefix, every_n_epochs=every_n_epochs, bank_size=bank_size, k=k, temperature=temperature,
                        shots=shots, draws=draws, l2_reg=l2_reg)
        if net is not None:
            check_features(net, setting or f"{prefix}.every_n_epochs={every_n_epochs}", fix)
        self.every_n_epochs, self.prefix = every_n_epochs, prefix
        self.bank_size, self.k, self.temperature = int(bank_size), int(k), float(temperature)
        self.shots, self.draws, self.l2_reg, self.seed = [int(s) for s in shots], int(draws), float(l2_reg), int(seed)
        self.results: dict[str, float] = {}
        #: How many bank and validation images the last scores came from.
        self.counts: dict[str, int] = {}
        self._images: tuple[torch.Tensor, torch.Tensor] | None = None  # the bank's uint8 images, read once
        self._active = False
        self._hook = None
        self._captured: torch.Tensor | None = None
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._seconds = 0.0

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING:
            return True
        if trainer.state.fn != TrainerFn.FITTING:
            return False
        epoch = trainer.current_epoch + 1
        last = (trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch) or (
            0 < trainer.max_steps <= trainer.global_step)
        return epoch % self.every_n_epochs == 0 or last

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = self._due(trainer)
        if not self._active:
            return
        start = time.perf_counter()
        datamodule = trainer.datamodule
        if self._images is None:
            self._images = bank_images(datamodule, self.bank_size, self.seed)
            fewest = int(torch.bincount(self._images[1], minlength=datamodule.num_classes).min())
            if fewest < max(self.shots) and trainer.is_global_zero:
                log.warning(f"the probes' bank of {len(self._images[1])} training images holds {fewest} of some class: "
                            f"its {max(self.shots)}-shot probe fits on fewer (raise {self.prefix}.bank_size)")
        images, labels = self._images
        share = slice(trainer.global_rank, None, trainer.world_size)
        features = extract_features(pl_module.net, images[share], datamodule.normalize, pl_module.device,
                                    datamodule.eval_batch_size, trainer.precision_plugin.forward_context)
        self._bank = (_gather(trainer, features), _gather(trainer, labels[share].to(pl_module.device)))
        self._val, self._captured = [], None
        if _head_input_hookable(pl_module):
            self._hook = pl_module.net.linear_head.register_forward_pre_hook(self._catch)
        self._seconds = time.perf_counter() - start

    def _catch(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if self._captured is None:  # the first call of a batch: its plain forward
            self._captured = inputs[0].detach()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active:
            return
        start = time.perf_counter()
        images, labels = batch[0], batch[1]
        features, self._captured = self._captured, None
        if features is None:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                features = pl_module.net.features(images)
        # A padded batch (a compiled network's last one) has more rows than labels.
        self._val.append((features[: len(labels)].float(), labels))
        self._seconds += time.perf_counter() - start

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        start = time.perf_counter()
        self._remove_hook()
        self._active = False
        (bank, bank_labels), self._bank, val, self._val = self._bank, None, self._val, []
        if not val:  # no validation batch ran
            return
        queries = _gather(trainer, torch.cat([features for features, _ in val]))
        query_labels = _gather(trainer, torch.cat([labels for _, labels in val]))
        num_classes = int(trainer.datamodule.num_classes)
        self.results = probe_scores(bank, bank_labels, queries, query_labels, num_classes, self.k, self.temperature,
                                    self.shots, self.draws, self.seed, self.l2_reg)
        for key, value in self.results.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)
        self.counts = {"bank_images": len(bank), "val_images": len(queries)}
        self._seconds += time.perf_counter() - start
        where = f"epoch {trainer.current_epoch + 1}" if trainer.state.fn == TrainerFn.FITTING else "validation"
        if trainer.is_global_zero:
            log.info(f"probes ({where}, bank {len(bank)}, {len(queries)} validation images, {self._seconds:.2f} s): "
                     + ", ".join(f"{key.removeprefix('probe/')} {value:.4f}" for key, value in self.results.items()))
        if trainer.state.fn == TrainerFn.FITTING:
            from vitlab.records import RunRecord

            for callback in trainer.callbacks:
                if isinstance(callback, RunRecord):
                    callback.add_epoch_metrics(self.results)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook, self._captured = None, None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hook()
        self._active = False


def _check_settings(prefix: str, **settings: Any) -> None:
    """Each setting's type and range (``<prefix>.<name>``), named with the fix."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    every = settings["every_n_epochs"]
    if not whole(every):
        raise ValueError(f"{prefix}.every_n_epochs={every!r} must be a positive number of epochs, e.g. 1, or null "
                         f"(no probes).")
    for name in ("bank_size", "k", "draws"):
        if not whole(settings[name]):
            raise ValueError(f"{prefix}.{name}={settings[name]!r} must be a positive whole number (defaults: bank_size "
                             f"10000, k 20, draws 3).")
    shots = settings["shots"]
    if isinstance(shots, (str, bytes)) or not isinstance(shots, Sequence) or not shots or not all(map(whole, shots)):
        raise ValueError(f"{prefix}.shots={shots!r} must be a list of positive numbers of images per class, e.g. "
                         f"[1, 5, 10, 25].")
    for name in ("temperature", "l2_reg"):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{prefix}.{name}={value!r} must be a positive number (defaults: temperature 0.07, "
                             f"l2_reg 1024).")


# --- a checkpoint: vitlab.eval probe=true --------------------------------------------------------


class _FrozenFeatures(L.LightningModule):
    """The network alone, for ``trainer.validate``: validation does nothing but let the probe
    callback read each batch's features (the classes of the data may differ from the head's)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None


#: The settings of a ``probe`` section (``conf/train.yaml``; ``probe_settings`` in ``conf/eval.yaml``).
SETTINGS = ("bank_size", "k", "temperature", "shots", "draws", "l2_reg", "seed")


def settings_of(section: Any, prefix: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The probe settings of a config section as plain values; an unknown key is named."""
    settings = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    unknown = sorted(set(settings) - set(SETTINGS) - set(extra))
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]} is not a probe setting: use {', '.join(extra + SETTINGS)}.")
    return settings


def probe_callbacks(section: Any, net: nn.Module) -> list[FeatureProbe]:
    """``[FeatureProbe]`` when the ``probe`` section of a training config sets
    ``every_n_epochs``, else ``[]``; a network without pooled features is refused here, before
    training starts."""
    if not section or section.get("every_n_epochs") is None:
        return []
    return [FeatureProbe(net, **settings_of(section, "probe", extra=("every_n_epochs",)))]


def eval_probe(net: nn.Module, section: Any, prefix: str = "probe_settings") -> FeatureProbe:
    """The probe callback of ``vitlab.eval probe=true``, its settings checked and the network's
    pooled features required before anything is evaluated."""
    return FeatureProbe(net, every_n_epochs=1, prefix=prefix, setting="probe=true", fix="leave probe=false",
                        **settings_of(section, prefix))


def probe_network(net: nn.Module, datamodule, trainer: L.Trainer, probe: FeatureProbe) -> dict[str, float]:
    """The probes of ``net`` on ``datamodule`` (bank from its training split, scored on its
    validation split), run by ``trainer.validate`` with ``probe`` among its callbacks."""
    trainer.validate(_FrozenFeatures(net), datamodule=datamodule, verbose=False)
    return dict(probe.results)
