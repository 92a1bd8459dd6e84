"""Micro-benchmark of the training-batch augmentations: images/s on one thread.

For each augmentation: torchvision's v2 transform called on the whole batch (one parameter
draw for all images: fast but not per-image random), the same transform called once per
image (per-image random, a Python call per image), and vitlab's batched per-image version.
Then whole pipelines as the datamodule runs them (augment + normalise).

    python scripts/bench_augment.py                      # 128x1x28x28 (Fashion-MNIST)
    python scripts/bench_augment.py --shape 128 3 32 32  # CIFAR
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.transforms import v2

from vitlab.data.augment import Augmentations, MixUpCutMix, RandAugment, RandomCropFlip, RandomErasing


def per_image(transform):
    return lambda x: torch.stack([transform(img) for img in x])


def images_per_s(fn, batch: torch.Tensor, min_time: float, repeats: int) -> float:
    fn(batch)  # warm-up
    rates = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_time:
            fn(batch)
            n += len(batch)
        rates.append(n / elapsed)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[128, 1, 28, 28], metavar=("B", "C", "H", "W"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per row (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, c, h, w = args.shape
    pixels = torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8)
    labels = torch.randint(0, 10, (b,))
    mean, std = torch.full((1, c, 1, 1), 0.5), torch.full((1, c, 1, 1), 0.25)

    def normalize(x):
        return (x.float().div_(255) - mean) / std

    normed = normalize(pixels)
    pad = 4 if h >= 32 else 1
    mix = MixUpCutMix(num_classes=10)
    rows = [
        ("normalise (uint8 -> float)", "", normalize, pixels),
        ("crop+flip", "v2 on batch", v2.Compose([v2.RandomCrop(h, padding=pad), v2.RandomHorizontalFlip()]), pixels),
        ("crop+flip", "v2 per image", per_image(v2.Compose([v2.RandomCrop(h, padding=pad), v2.RandomHorizontalFlip()])),
         pixels),
        ("crop+flip", "vitlab batched", RandomCropFlip(pad, True), pixels),
        ("RandAugment n=2 m=9", "v2 on batch", v2.RandAugment(2, 9), pixels),
        ("RandAugment n=2 m=9", "v2 per image", per_image(v2.RandAugment(2, 9)), pixels),
        ("RandAugment n=2 m=9", "vitlab grouped", RandAugment(2, 9), pixels),
        ("random erasing p=0.25", "v2 on batch", v2.RandomErasing(0.25), normed),
        ("random erasing p=0.25", "v2 per image", per_image(v2.RandomErasing(0.25)), normed),
        ("random erasing p=0.25", "vitlab batched", RandomErasing(0.25), normed),
        ("MixUp/CutMix", "v2 on batch (vitlab)", lambda x: mix(x, labels), normed),
    ]
    pipelines = {
        "crop+flip (dataset default)": {"crop_flip": RandomCropFlip(pad, True)},
        "crop+flip + RandAugment": {"crop_flip": RandomCropFlip(pad, True), "randaugment": RandAugment(2, 9)},
        "strong: + erasing + MixUp/CutMix": {"crop_flip": RandomCropFlip(pad, True), "randaugment": RandAugment(2, 9),
                                             "random_erasing": RandomErasing(0.25), "mixup_cutmix": mix},
    }
    for name, augment in pipelines.items():
        pipeline = Augmentations(augment)
        rows.append((f"pipeline: {name}", "incl. normalise", lambda x, p=pipeline: p(x, labels, normalize), pixels))

    print(f"batch {b}x{c}x{h}x{w}, {args.threads} thread(s), median of {args.repeats} x {args.min_time} s\n")
    print("| augmentation | implementation | images/s |\n| --- | --- | ---: |")
    for name, how, fn, batch in rows:
        print(f"| {name} | {how} | {images_per_s(fn, batch, args.min_time, args.repeats):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
