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
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from vitlab.data.errors import DataError

TRAIN_CROPS = ("random_resized", "center")
RESIZE_MODES = ("crop", "stretch")


class BadImageError(DataError):
    """An image file (or stored sample) that cannot be decoded."""


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


def resize_to(image: torch.Tensor, size: int, resize: str = "crop") -> torch.Tensor:
    """``crop``: shorter side to ``size``, then the centre square; ``stretch``: both sides."""
    if resize == "stretch":
        return F.resize(image, [size, size], antialias=True).contiguous()
    return F.center_crop(F.resize(image, [size], antialias=True), [size, size]).contiguous()


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


class SampleTransform:
    """The per-image transform of one split: ``transform(image_uint8, seed) -> (C, S, S) uint8``.

    - training, ``train_crop=random_resized``: a crop of ``scale`` of the area and ``ratio`` of
      aspect, resized to ``image_size`` (Szegedy et al. 2015's Inception crop), then a
      horizontal flip with probability 1/2 if ``hflip``;
    - training, ``train_crop=center``: resized as for evaluation, then the flip;
    - evaluation: the shorter side to ``image_size / crop_pct``, the centre ``image_size``
      square (``resize=stretch``: both sides to ``image_size``, nothing cut).

    Picklable, so DataLoader workers receive it.
    """

    def __init__(self, image_size: int, *, train: bool, train_crop: str = "random_resized",
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: bool = True, crop_pct: float = 0.875, resize: str = "crop"):
        check_transform_options(image_size=image_size, train_crop=train_crop, scale=scale, crop_pct=crop_pct,
                                resize=resize)
        self.image_size, self.train, self.resize, self.crop_pct = image_size, train, resize, crop_pct
        steps: list = []
        if train and train_crop == "random_resized":
            steps.append(v2.RandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True))
        if train and hflip:
            steps.append(v2.RandomHorizontalFlip())
        self.random = v2.Compose(steps) if steps else None
        self.crop_first = not (train and train_crop == "random_resized")

    def evaluation_resize(self, image: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if self.resize == "stretch":
            return F.resize(image, [size, size], antialias=True)
        return F.center_crop(F.resize(image, [round(size / self.crop_pct)], antialias=True), [size, size])

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if self.crop_first:
            image = self.evaluation_resize(image)
        if self.random is not None:
            if seed is None:
                image = self.random(image)
            else:
                # torchvision draws its parameters from torch's global generator: seed it for this
                # sample only, and leave the process's own stream as it was.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    image = self.random(image)
        return image.contiguous()

    def __repr__(self) -> str:
        steps = ["evaluation resize"] if self.crop_first else []
        return f"SampleTransform({', '.join(steps + [repr(self.random)] if self.random else steps)})"
