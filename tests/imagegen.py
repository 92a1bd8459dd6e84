"""Small image folders written on the fly for the image-folder, eval and predict tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.io import write_jpeg, write_png

#: One colour per class, so a small model separates them in a few steps.
COLOURS = {"cat": (230, 60, 60), "dog": (40, 170, 40), "owl": (20, 20, 110)}  # distinct in grayscale too


def write_image(path: Path, rgb: tuple[int, int, int], height: int, width: int, seed: int, mode: str = "RGB") -> Path:
    """A noisy image of one colour: PNG or JPEG by the file ending, RGB or grayscale (``L``)."""
    gen = torch.Generator().manual_seed(seed)
    noise = 30 * torch.randn(3, height, width, generator=gen)
    image = (torch.tensor(rgb).view(3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
    if mode == "L":
        image = image.float().mean(0, keepdim=True).to(torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        write_jpeg(image if mode != "L" else image.expand(3, -1, -1).contiguous(), str(path))
    else:
        write_png(image, str(path))
    return path


def make_image_folder(root: Path, splits=("train", "val"), per_class: int = 8, classes=tuple(COLOURS)) -> Path:
    """``root/<split>/<class>/<i>.{png,jpg}`` with mixed sizes and modes (RGB PNG, grayscale PNG, JPEG)."""
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            for i in range(per_class):
                ending, mode = [(".png", "RGB"), (".png", "L"), (".jpg", "RGB")][i % 3]
                write_image(root / split / name / f"{i}{ending}", COLOURS[name], 18 + i % 7, 22 + i % 5,
                            seed=1000 * s + 100 * c + i, mode=mode)
    return root
