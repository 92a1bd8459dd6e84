"""Batched training augmentation on the device, with parameters drawn per image.

torchvision's ``transforms.v2`` draw one set of parameters per call, so on a batch tensor
every image would get the same crop, the same RandAugment ops, the same erased box. Calling
them once per image costs a Python round trip per image (measured in
``scripts/bench_augment.py``), which on a CPU competes with the model for the same cores.
The classes here draw the parameters of every image at once and then apply torchvision's own
operations (public ``transforms.v2.functional`` only, so that torchvision need not be pinned)
to the whole batch, or to the groups of images that drew the same operation.

An augmentation declares where it runs with ``stage``:

- ``"pixels"``: on the uint8 batch before normalisation (crop, flip, RandAugment); also the
  stage of any other module (e.g. a torchvision transform) passed in ``data.augment``;
- ``"normalized"``: on the normalised float batch (random erasing: the value 0 is the mean);
- ``"labels"``: takes and returns ``(images, targets)`` (MixUp/CutMix: soft targets).

``Augmentations`` runs a named set of them in that order, whatever the order of the names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

STAGES = ("pixels", "normalized", "labels")


def _bins(low: float, high: float) -> Callable[[int, int, int], torch.Tensor]:
    return lambda bins, h, w: torch.linspace(low, high, bins)


# RandAugment's 14 operations as torchvision's v2.RandAugment defines them, on a uint8 batch:
# name -> (magnitude of each bin for (bins, H, W) images, or None; signed; the operation).
# tests/test_augment.py checks every output against v2.RandAugment's.
RANDAUGMENT_OPS: dict[str, tuple] = {
    "Identity": (None, False, lambda x, v, how: x),
    "ShearX": (_bins(0.0, 0.3), True, lambda x, v, how: TF.affine(
        x, 0.0, [0, 0], 1.0, [math.degrees(math.atan(v)), 0.0], center=[0, 0], **how)),
    "ShearY": (_bins(0.0, 0.3), True, lambda x, v, how: TF.affine(
        x, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(v))], center=[0, 0], **how)),
    "TranslateX": (lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, bins), True,
                   lambda x, v, how: TF.affine(x, 0.0, [int(v), 0], 1.0, [0.0, 0.0], **how)),
    "TranslateY": (lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, bins), True,
                   lambda x, v, how: TF.affine(x, 0.0, [0, int(v)], 1.0, [0.0, 0.0], **how)),
    "Rotate": (_bins(0.0, 30.0), True, lambda x, v, how: TF.rotate(x, v, **how)),
    "Brightness": (_bins(0.0, 0.9), True, lambda x, v, how: TF.adjust_brightness(x, 1.0 + v)),
    "Color": (_bins(0.0, 0.9), True, lambda x, v, how: TF.adjust_saturation(x, 1.0 + v)),
    "Contrast": (_bins(0.0, 0.9), True, lambda x, v, how: TF.adjust_contrast(x, 1.0 + v)),
    "Sharpness": (_bins(0.0, 0.9), True, lambda x, v, how: TF.adjust_sharpness(x, 1.0 + v)),
    "Posterize": (lambda bins, h, w: (8 - torch.arange(bins) / ((bins - 1) / 4)).round().int(), False,
                  lambda x, v, how: TF.posterize(x, int(v))),
    "Solarize": (_bins(1.0, 0.0), False, lambda x, v, how: TF.solarize(x, 255.0 * v)),
    "AutoContrast": (None, False, lambda x, v, how: TF.autocontrast(x)),
    "Equalize": (None, False, lambda x, v, how: TF.equalize(x)),
}


class RandomCropFlip(nn.Module):
    """Per-image random crop after zero padding (a random shift of up to ``padding`` pixels)
    and, if ``hflip``, a random horizontal flip with probability 1/2.

    Works on uint8 or float batches (B, C, H, W); each image draws its own shift and flip.
    """

    stage = "pixels"

    def __init__(self, padding: int = 0, hflip: bool = False):
        super().__init__()
        if padding < 0:
            raise ValueError(f"data.augment.crop_flip.padding={padding} must be >= 0")
        self.padding, self.hflip = padding, hflip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not (self.padding or self.hflip):
            return images
        b, c, h, w = images.shape
        dev, p = images.device, self.padding
        padded = F.pad(images, (p, p, p, p)) if p else images
        # Two gathers with per-image indices: rows shifted by dy, columns shifted by dx and,
        # for flipped images, read right to left.
        cols = torch.arange(w, device=dev).expand(b, w)
        if self.hflip:
            cols = torch.where(torch.rand(b, 1, device=dev) < 0.5, cols.flip(-1), cols)
        if p:
            dy = torch.randint(0, 2 * p + 1, (b, 1), device=dev)
            dx = torch.randint(0, 2 * p + 1, (b, 1), device=dev)
            rows = (dy + torch.arange(h, device=dev)).view(b, 1, h, 1)
            padded = padded.gather(2, rows.expand(b, c, h, w + 2 * p))
            cols = cols + dx
        return padded.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))

    def extra_repr(self) -> str:
        return f"padding={self.padding}, hflip={self.hflip}"


class RandAugment(nn.Module):
    """RandAugment (Cubuk et al. 2020): ``n`` operations per image, each chosen uniformly from
    torchvision's 14 (``RANDAUGMENT_OPS``), all at magnitude ``m`` (of ``num_magnitude_bins``),
    signed ops negated with probability 1/2: ``v2.RandAugment``'s operations, magnitudes and
    kernels, with the draw made per image.

    In each of the ``n`` rounds, the images that drew the same (operation, sign) go through its
    kernel together. With nearest sampling, the geometric ops (shear, translate, rotate) are
    instead one gather for all the images that drew one: each (op, sign) moves pixels by a fixed
    map, read once per image size off torchvision's kernel applied to an image of pixel indices.
    Input: a uint8 batch (B, C, H, W).
    """

    stage = "pixels"
    geometric = range(2, 12)  # the keys (op * 2 + negate) of ShearX ... Rotate, adjacent in RANDAUGMENT_OPS

    def __init__(self, n: int = 2, m: int = 9, num_magnitude_bins: int = 31, interpolation: str = "nearest",
                 fill: float | Sequence[float] | None = None):
        super().__init__()
        if n < 0:
            raise ValueError(f"data.augment.randaugment.n={n} must be >= 0 (operations per image)")
        if not 0 <= m < num_magnitude_bins:
            raise ValueError(f"data.augment.randaugment.m={m} must be in [0, {num_magnitude_bins - 1}] "
                             f"(num_magnitude_bins={num_magnitude_bins})")
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"data.augment.randaugment.interpolation={interpolation!r}: use nearest or bilinear")
        self.n, self.m, self.num_magnitude_bins = n, m, num_magnitude_bins
        fill = fill if fill is None or isinstance(fill, (int, float)) else [float(v) for v in fill]
        self.how = {"interpolation": v2.InterpolationMode(interpolation), "fill": fill}
        self.ops = list(RANDAUGMENT_OPS)
        self.signed = torch.tensor([signed for _, signed, _ in RANDAUGMENT_OPS.values()])
        self._tables: dict = {}  # (H, W, device) -> table()

    def table(self, h: int, w: int, device: torch.device) -> tuple[list[float], torch.Tensor | None]:
        """The signed magnitude of each key (op * 2 + negate) and the geometric keys' pixel maps."""
        if (h, w, device) not in self._tables:
            maps, magnitudes = None, [sign * (0.0 if f is None else float(f(self.num_magnitude_bins, h, w)[self.m]))
                                      for f, _, _ in RANDAUGMENT_OPS.values() for sign in (1, -1)]
            if self.how["interpolation"] == v2.InterpolationMode.NEAREST and h * w <= 2**24:
                # Pixel indices are exact in float32 (up to 2**24); -1 marks the pixels that get the fill.
                index = torch.arange(h * w, dtype=torch.float32, device=device).view(1, 1, h, w)
                fill = {"interpolation": v2.InterpolationMode.NEAREST, "fill": -1.0}
                maps = torch.stack([RANDAUGMENT_OPS[self.ops[k // 2]][2](index, magnitudes[k], fill).view(h * w)
                                    for k in self.geometric]).long()
            self._tables[(h, w, device)] = magnitudes, maps
        return self._tables[(h, w, device)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"RandAugment expects a uint8 batch, got {images.dtype}")
        for _ in range(self.n):
            # Drawn on the CPU with the global generator, so that seeded runs repeat.
            b = len(images)
            op = torch.randint(len(self.ops), (b,))
            images = self.apply(images, op * 2 + ((torch.rand(b) <= 0.5) & self.signed[op]))
        return images

    def apply(self, images: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Image i through (operation, sign) ``key[i]`` (= op * 2 + negate)."""
        _, c, h, w = images.shape
        magnitudes, maps = self.table(h, w, images.device)
        # Sorted by key, the images of each key are one contiguous slice, the geometric keys too.
        order = key.argsort(stable=True)
        ends = torch.bincount(key, minlength=2 * len(self.ops)).cumsum(0).tolist()
        starts = [0] + ends[:-1]
        sorted_key, order = key[order].to(images.device), order.to(images.device)
        grouped = images[order]
        lo, hi = starts[self.geometric[0]], ends[self.geometric[-1]]
        if maps is not None and hi > lo:
            source = maps[sorted_key[lo:hi] - self.geometric[0]].unsqueeze(1)  # (g, 1, H * W)
            moved = grouped[lo:hi].flatten(2).gather(2, source.clamp(min=0).expand(-1, c, -1))
            fill = torch.tensor(self.how["fill"] or 0.0, device=images.device).round().to(images.dtype)
            grouped[lo:hi] = torch.where(source < 0, fill.view(1, -1, 1), moved).view(hi - lo, c, h, w)
        for k in range(2 * len(self.ops)):
            if ends[k] > starts[k] and not (maps is not None and k in self.geometric):
                grouped[starts[k]:ends[k]] = RANDAUGMENT_OPS[self.ops[k // 2]][2](
                    grouped[starts[k]:ends[k]], magnitudes[k], self.how)
        return torch.empty_like(grouped).index_copy_(0, order, grouped)

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}, num_magnitude_bins={self.num_magnitude_bins}"


class RandomErasing(nn.Module):
    """Random erasing (Zhong et al. 2020) with torchvision ``v2.RandomErasing``'s distribution,
    drawn per image: with probability ``p`` a box of area fraction uniform in ``scale`` and
    log-uniform aspect ratio in ``ratio`` (up to 10 tries to fit, else no box) is set to
    ``value`` (``"random"``: standard normal noise per pixel).

    Runs on the normalised batch, as in torchvision's and timm's recipes: value 0 is the
    dataset's mean colour.
    """

    stage = "normalized"
    tries = 10

    def __init__(self, p: float = 0.25, scale: Sequence[float] = (0.02, 0.33), ratio: Sequence[float] = (0.3, 3.3),
                 value: float | str = 0.0):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"data.augment.random_erasing.p={p} must be a probability in [0, 1]")
        if not (len(scale) == 2 and 0 <= scale[0] <= scale[1] <= 1):
            raise ValueError(f"data.augment.random_erasing.scale={list(scale)} must be [min, max] with 0 <= min <= max <= 1")
        if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"data.augment.random_erasing.ratio={list(ratio)} must be [min, max] with 0 < min <= max")
        if isinstance(value, str) and value != "random":
            raise ValueError(f"data.augment.random_erasing.value={value!r} must be a number or 'random'")
        self.p, self.scale, self.ratio, self.value = float(p), tuple(scale), tuple(ratio), value

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        dev = images.device
        # `tries` candidate boxes per image; the first that fits is used, as torchvision does.
        area = h * w * torch.empty(b, self.tries, device=dev).uniform_(*self.scale)
        log_ratio = torch.log(torch.tensor(self.ratio))
        aspect = torch.exp(torch.empty(b, self.tries, device=dev).uniform_(float(log_ratio[0]), float(log_ratio[1])))
        bh = torch.sqrt(area * aspect).round().long()
        bw = torch.sqrt(area / aspect).round().long()
        fits = (bh < h) & (bw < w)
        first = fits.int().argmax(1, keepdim=True)
        bh, bw = bh.gather(1, first), bw.gather(1, first)  # (b, 1)
        erase = fits.any(1, keepdim=True) & (torch.rand(b, 1, device=dev) < self.p)
        top = (torch.rand(b, 1, device=dev) * (h - bh + 1)).long()
        left = (torch.rand(b, 1, device=dev) * (w - bw + 1)).long()
        rows = torch.arange(h, device=dev).view(1, h)
        cols = torch.arange(w, device=dev).view(1, w)
        in_rows = (rows >= top) & (rows < top + bh) & erase  # (b, h)
        in_cols = (cols >= left) & (cols < left + bw)  # (b, w)
        mask = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (b, 1, h, w)
        fill = torch.randn_like(images) if self.value == "random" else torch.full_like(images, float(self.value))
        return torch.where(mask, fill, images)

    def extra_repr(self) -> str:
        return f"p={self.p}, scale={self.scale}, ratio={self.ratio}, value={self.value!r}"


class MixUpCutMix(nn.Module):
    """MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019) with torchvision ``v2.MixUp`` and
    ``v2.CutMix``: with probability ``prob`` a batch is mixed, by CutMix with probability
    ``switch_prob`` (when both alphas are > 0), else by MixUp. An alpha of 0 turns that one off.

    As in the papers and in the DeiT and big_vision recipes, one mixing ratio (and one CutMix
    box) is drawn per batch; each image is mixed with its neighbour in the shuffled batch.
    Always returns soft targets (B, num_classes), one-hot for a batch left unmixed, so the
    loss sees one kind of target.
    """

    stage = "labels"

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5):
        super().__init__()
        for name, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0 <= value <= 1:
                raise ValueError(f"data.augment.mixup_cutmix.{name}={value} must be a probability in [0, 1]")
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if value < 0:
                raise ValueError(f"data.augment.mixup_cutmix.{name}={value} must be >= 0 (0 turns it off)")
        self.num_classes = num_classes
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        choices = [t for t in (self.mixup, self.cutmix) if t is not None]
        if not choices or len(images) < 2 or float(torch.rand(())) >= self.prob:
            return images, F.one_hot(labels, self.num_classes).to(images.dtype)
        transform = choices[0] if len(choices) == 1 else (
            self.cutmix if float(torch.rand(())) < self.switch_prob else self.mixup)
        images, targets = transform(images, labels)
        return images, targets.to(images.dtype)

    def extra_repr(self) -> str:
        alphas = (self.mixup.alpha if self.mixup else 0.0, self.cutmix.alpha if self.cutmix else 0.0)
        return f"mixup_alpha={alphas[0]}, cutmix_alpha={alphas[1]}, prob={self.prob}, switch_prob={self.switch_prob}"


class Augmentations(nn.Module):
    """The training-batch augmentations of a datamodule, run stage by stage.

    Built from ``data.augment``: a mapping of names to modules (the config's form, so that
    ``augment=randaugment`` adds to the dataset's crop/flip; null entries are skipped), a
    list, or one module.
    """

    def __init__(self, augment: Mapping[str, nn.Module | None] | Sequence[nn.Module] | nn.Module):
        super().__init__()
        if isinstance(augment, nn.Module):
            named = [(type(augment).__name__, augment)]
        elif isinstance(augment, Mapping):
            named = [(str(k), v) for k, v in augment.items() if v is not None]
        else:
            named = [(f"{i}_{type(a).__name__}", a) for i, a in enumerate(augment) if a is not None]
        for name, module in named:
            if not isinstance(module, nn.Module):
                raise ValueError(f"data.augment.{name} is {module!r}, not an augmentation module: give it a _target_")
            if stage_of(module) not in STAGES:
                raise ValueError(f"data.augment.{name} has stage={stage_of(module)!r}; expected one of {STAGES}")
        # A stable sort: within a stage, the order of the config.
        named.sort(key=lambda item: STAGES.index(stage_of(item[1])))
        self.steps = nn.ModuleDict(named)

    def __len__(self) -> int:
        return len(self.steps)

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                normalize: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a uint8 training batch; returns normalised images and the targets."""
        normalized = False
        for module in self.steps.values():
            stage = stage_of(module)
            if stage != "pixels" and not normalized:
                images, normalized = normalize(images), True
            if stage == "labels":
                images, labels = module(images, labels)
            else:
                images = module(images)
        return (images if normalized else normalize(images)), labels


def stage_of(module: nn.Module) -> str:
    """Where an augmentation runs; modules that do not say (torchvision's) work on pixels."""
    return getattr(module, "stage", "pixels")
