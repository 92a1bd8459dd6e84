"""Micro-benchmark of the training-batch augmentations: images/s on one thread.

Each row times vitlab's batched per-image version against the alternatives: torchvision's v2
transform on the whole batch (one parameter draw for all images), the same once per image, and
kornia's (if installed) and timm's versions, each noted where its results differ. The
implementations of a row take turns in every repeat, timed by CPU time, so that a shared,
noisy machine slows them alike; the table gives medians and the ratio to vitlab. Then whole
pipelines as the datamodule runs them (augment + normalise).

    python scripts/bench_augment.py                      # 128x1x28x28 (Fashion-MNIST)
    python scripts/bench_augment.py --shape 128 3 32 32  # CIFAR
    git show HEAD~1:src/vitlab/data/augment.py > /tmp/old.py
    python scripts/bench_augment.py --baseline /tmp/old.py   # and that version of vitlab's
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
from torchvision.transforms import v2

from vitlab.data import augment as vitlab

ROWS = {"crop_flip": "crop+flip", "randaugment": "RandAugment n=2 m=9", "random_erasing": "random erasing p=0.25",
        "mixup_cutmix": "MixUp/CutMix"}


def per_image(transform):
    return lambda x: torch.stack([transform(img) for img in x])


def rate(fn, batch: torch.Tensor, min_time: float, clock) -> float:
    n, start = 0, clock()
    while (elapsed := clock() - start) < min_time:
        fn(batch)
        n += len(batch)
    return n / elapsed


def modules(aug, pad: int) -> dict[str, torch.nn.Module]:
    """The benchmarked augmentations of ``aug``, a version of vitlab's augment module."""
    return {"crop_flip": aug.RandomCropFlip(pad, True), "randaugment": aug.RandAugment(2, 9),
            "random_erasing": aug.RandomErasing(0.25), "mixup_cutmix": aug.MixUpCutMix(num_classes=10)}


def alternatives(pad: int, h: int, labels: torch.Tensor) -> dict[str, dict]:
    crop_flip = v2.Compose([v2.RandomCrop(h, padding=pad), v2.RandomHorizontalFlip()])
    out = {ROWS["crop_flip"]: {"v2 on batch": crop_flip, "v2 per image": per_image(crop_flip)},
           ROWS["randaugment"]: {"v2 on batch": v2.RandAugment(2, 9), "v2 per image": per_image(v2.RandAugment(2, 9))},
           ROWS["random_erasing"]: {"v2 on batch": v2.RandomErasing(0.25),
                                    "v2 per image": per_image(v2.RandomErasing(0.25))}}
    try:
        import kornia.augmentation as K
        from kornia.augmentation.auto import RandAugment
    except ImportError:
        print("kornia is not installed (pip install kornia): its rows are left out")
    else:
        # kornia takes float images only (converted in the timing), its colour ops RGB only.
        k_crop_flip, k_randaugment = torch.nn.Sequential(K.RandomCrop((h, h), padding=pad),
                                                         K.RandomHorizontalFlip()), RandAugment(n=2, m=9)
        out[ROWS["crop_flip"]]["kornia (float input)"] = lambda x: k_crop_flip(x.float())
        out[ROWS["randaugment"]]["kornia (ops drawn per batch, its own table)"] = lambda x: k_randaugment(
            x.float().expand(-1, 3, -1, -1) / 255)
        out[ROWS["random_erasing"]]["kornia (clamped boxes, not redrawn)"] = K.RandomErasing(p=0.25)
    from timm.data import Mixup
    timm_mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=10)
    out[ROWS["mixup_cutmix"]] = {"timm Mixup (numpy RNG, x.flip(0) pairs)": lambda x: timm_mix(x.clone(), labels)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[128, 1, 28, 28], metavar=("B", "C", "H", "W"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=15, help="measurements per implementation (median reported)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="cpu: this process's CPU time")
    parser.add_argument("--baseline", help="another version of vitlab/data/augment.py to compare with")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    b, c, h, w = args.shape
    pixels = torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8)
    labels = torch.randint(0, 10, (b,))
    mean, std = torch.full((1, c, 1, 1), 0.5), torch.full((1, c, 1, 1), 0.25)

    def normalize(x):
        return (x.float().div_(255) - mean) / std

    pad = 4 if h >= 32 else 1
    versions = {"vitlab": vitlab}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_augment", args.baseline)
        versions["baseline"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(versions["baseline"])
    rows: dict[str, dict] = {row: {} for row in ROWS.values()}
    pipelines = {"crop+flip (dataset default)": 1, "crop+flip + RandAugment": 2, "strong: + erasing + MixUp/CutMix": 4}
    for who, aug in versions.items():
        for name, module in modules(aug, pad).items():
            rows[ROWS[name]][who] = (lambda x, m=module: m(x, labels)) if name == "mixup_cutmix" else module
        for name, steps in pipelines.items():
            pipeline = aug.Augmentations(dict(list(modules(aug, pad).items())[:steps]))
            rows.setdefault(f"pipeline: {name}", {})[f"{who}, incl. normalise"] = lambda x, p=pipeline: p(
                x, labels, normalize)
    for row, impls in alternatives(pad, h, labels).items():
        rows[row].update(impls)

    print(f"batch {b}x{c}x{h}x{w}, {args.threads} thread(s), median of {args.repeats} x {args.min_time} s "
          f"({args.clock} time), implementations of a row interleaved\n")
    print("| augmentation | implementation | images/s | vs vitlab |\n| --- | --- | ---: | ---: |")
    for row, impls in rows.items():
        # Erasing and MixUp/CutMix run on the normalised batch, the others on pixels.
        batch = normalize(pixels) if row in (ROWS["random_erasing"], ROWS["mixup_cutmix"]) else pixels
        for fn in impls.values():
            fn(batch)  # warm-up
        rates: dict[str, list[float]] = {how: [] for how in impls}
        for _ in range(args.repeats):
            for how, fn in impls.items():
                rates[how].append(rate(fn, batch, args.min_time, clock))
        medians = {how: statistics.median(r) for how, r in rates.items()}
        first = next(iter(medians.values()))  # vitlab's
        for how, median in medians.items():
            print(f"| {row} | {how} | {median:,.0f} | {median / first:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
