"""Per-image decoding and transforms for datasets read sample by sample (streaming image
folders, shards): encoded bytes in, a uint8 ``(C, S, S)`` tensor out.

Normalisation and the ``augment=`` entries stay batched on the training device (as for the
in-memory datasets); what needs each full-resolution image runs here, in the DataLoader
workers: the training crop (Inception-style random-resized crop, or resize and centre crop)
and the horizontal flip, and for evaluation a resize of the shorter side to
``image_size / crop_pct`` and a centre crop.

Randomness is a function of a per-sample seed that the sampler derives from the run's seed,
the epoch and the sample's index, never of a worker's generator: the same sample of the same
epoch is cropped the same way with any number of workers, and after a resume.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as F

from vitlab.errors import BadImageError

TRAIN_CROPS = ("random_resized", "center")
RESIZE_MODES = ("crop", "stretch")
DECODE_ON = ("workers", "device")


def decode(data: bytes | bytearray | memoryview | torch.Tensor, channels: int, name: str = "image") -> torch.Tensor:
    """Encoded image bytes as uint8 ``(channels, H, W)``: RGB or grayscale whatever the file's
    mode, EXIF rotation applied, 16-bit images scaled to 8 bits, the first frame of an
    animation. torchvision's decoders (JPEG, PNG, WebP, GIF, AVIF/HEIC where built) first,
    Pillow for the rest (BMP, TIFF, PPM/PGM, ...). ``name`` names the file in the error."""
    raw = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        image = decode_image(raw, mode=mode, apply_exif_orientation=True)
    except RuntimeError:
        try:
            with Image.open(io.BytesIO(raw.numpy().tobytes())) as pil:
                image = F.pil_to_tensor(pil.convert("RGB" if channels == 3 else "L"))
        except UnidentifiedImageError:
            raise BadImageError(f"{name} cannot be read as an image (not a format torchvision or Pillow decodes, "
                                f"or damaged): replace or delete the file.") from None
        except (OSError, ValueError, SyntaxError) as err:
            raise BadImageError(f"{name} cannot be read as an image ({err}): replace or delete the file.") from None
    if image.ndim == 4:  # an animated image: its first frame
        image = image[0]
    if image.dtype != torch.uint8:
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def decode_batch(encoded: Sequence[bytes | torch.Tensor], channels: int, device: torch.device | str,
                 names: Sequence[str]) -> list[torch.Tensor | BadImageError]:
    """A batch of encoded images decoded on ``device`` (nvJPEG on a CUDA device, in one call):
    uint8 ``(channels, H, W)`` tensors there, or a ``BadImageError`` for each image that cannot be
    decoded. Images that are not JPEG, or that the batched decoder refuses, are decoded one by
    one on the CPU (``decode``) and moved."""
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) if not isinstance(data, torch.Tensor) else data
               for data in encoded]
    jpeg = [i for i, data in enumerate(encoded) if len(data) > 2 and data[0] == 0xFF and data[1] == 0xD8]
    out: list = [None] * len(encoded)
    if jpeg:
        try:
            decoded = decode_jpeg([encoded[i] for i in jpeg], mode=mode, device=device, apply_exif_orientation=True)
            for i, image in zip(jpeg, decoded):
                out[i] = image
        except RuntimeError:
            pass  # one bad file fails the whole call: decode them one by one below
    for i, data in enumerate(encoded):
        if out[i] is None:
            try:
                out[i] = decode(data, channels, name=names[i]).to(device)
            except BadImageError as err:
                out[i] = err
    return out


def resize_to(image: torch.Tensor, size: int, resize: str = "crop", crop_pct: float = 1.0) -> torch.Tensor:
    """``crop``: shorter side to ``size / crop_pct``, then the centre ``size`` square; ``stretch``:
    both sides to ``size``."""
    if resize == "stretch":
        return F.resize(image, [size, size], antialias=True).contiguous()
    return F.center_crop(F.resize(image, [round(size / crop_pct)], antialias=True), [size, size]).contiguous()


def check_transform_options(*, image_size: int, train_crop: str, scale: Sequence[float], crop_pct: float,
                            resize: str) -> None:
    if train_crop not in TRAIN_CROPS:
        raise ValueError(f"data.train_crop={train_crop} is not one of {list(TRAIN_CROPS)}.")
    if resize not in RESIZE_MODES:
        raise ValueError(f"data.resize={resize} is not one of {list(RESIZE_MODES)}.")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"data.scale={list(scale)} must be [min, max] area fractions with 0 < min <= max <= 1, "
                         f"e.g. [0.08, 1.0] (Inception) or [0.05, 1.0] (big_vision).")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"data.crop_pct={crop_pct} must be in (0, 1]: evaluation resizes the shorter side to "
                         f"image_size / crop_pct and crops the centre (0.875 is the usual value).")
    if image_size <= 0:
        raise ValueError(f"data.image_size={image_size} must be positive.")


def inception_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                  rng: random.Random) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop covering ``scale`` of the area with an aspect ratio
    (w / h) drawn log-uniformly from ``ratio`` (Szegedy et al. 2015): ten draws, then the
    largest centred box whose ratio is in range."""
    area = height * width
    low, high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target, aspect = area * rng.uniform(scale[0], scale[1]), math.exp(rng.uniform(low, high))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


class SampleTransform:
    """The per-image transform of one split: ``transform(image_uint8, seed) -> (C, S, S) uint8``.

    - training, ``train_crop=random_resized``: a crop of ``scale`` of the area and ``ratio`` of
      aspect, resized to ``image_size`` (Szegedy et al. 2015's Inception crop), then a
      horizontal flip with probability 1/2 if ``hflip``;
    - training, ``train_crop=center``: resized as for evaluation, then the flip;
    - evaluation: the shorter side to ``image_size / crop_pct``, the centre ``image_size``
      square (``resize=stretch``: both sides to ``image_size``, nothing cut).

    The crop and flip are drawn from ``random.Random(seed)`` (no seed: from torch's generator).
    Picklable, so DataLoader workers receive it.
    """

    def __init__(self, image_size: int, *, train: bool, train_crop: str = "random_resized",
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: bool = True, crop_pct: float = 0.875, resize: str = "crop"):
        check_transform_options(image_size=image_size, train_crop=train_crop, scale=scale, crop_pct=crop_pct,
                                resize=resize)
        self.image_size, self.train, self.resize, self.crop_pct = image_size, train, resize, crop_pct
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.random_crop = train and train_crop == "random_resized"
        self.hflip = train and hflip

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if not (self.random_crop or self.hflip):
            return resize_to(image, self.image_size, self.resize, self.crop_pct)
        rng = random.Random(seed if seed is not None else int(torch.randint(2**62, ())))
        if self.random_crop:
            top, left, h, w = inception_box(image.shape[-2], image.shape[-1], self.scale, self.ratio, rng)
            image = F.resized_crop(image, top, left, h, w, [self.image_size, self.image_size], antialias=True)
        else:
            image = resize_to(image, self.image_size, self.resize, self.crop_pct)
        if self.hflip and rng.random() < 0.5:
            image = F.horizontal_flip(image)
        return image.contiguous()

    def __repr__(self) -> str:
        crop = f"inception crop {self.scale} {self.ratio}" if self.random_crop else f"resize ({self.resize})"
        return f"SampleTransform({self.image_size}, {crop}, hflip={self.hflip})"
