"""Images/s of the training input pipeline at 224 px from JPEG files, per DataLoader worker.

    python scripts/bench_data.py                         # generated folder, 1 and 2 workers
    python scripts/bench_data.py --root /tmp/bench_jpegs # keep the folder for the next run
    python scripts/bench_data.py --workers 1 2 4 --rounds 7

A benchmark, never a test. It writes a folder of photo-like JPEGs (``--images`` of them, ten
classes, 350-500 x 300-420 px with a third in portrait, as most of ImageNet's, quality 90)
unless ``--root`` already holds one, then times these paths on the same files, each with
``--workers`` workers (1 and 2):

- seed:    a plain PyTorch loader: ``torchvision.datasets.ImageFolder`` with
           ``Compose([Resize((224, 224)), ToTensor()])`` in a shuffled ``DataLoader``;
- vitlab:  ``ImageFolderDataModule(in_memory=False)``'s real training loader (torchvision
           decoding, the Inception crop of the ImageNet recipe and the flip in the workers);
           its batches are uint8, normalised on the training device after the copy, which is
           not timed here (on a CPU it cost about 1.2 ms per 224 px image in the main process,
           one thread; the seed's batches are float in [0, 1], not normalised either);
- shards:  ``data=shards`` (LitData) over shards written from the same folder in 4 MB chunks,
           when ``src/vitlab/data/shards.py`` exists (skipped with a message otherwise).

Each measurement is one epoch of a fresh loader, from the moment every worker has delivered
its first batch (start-up left out) to the last batch, measured two ways: images/s of wall time,
and images per CPU-second of the main process and the workers together (/proc/<pid>/stat),
which other jobs on a shared machine disturb much less. Paths take turns within each of
``--rounds`` rounds (A B A B), so drifts hit all alike. Reported: the median of each path and
worker count, and <path>/seed as the median over rounds of the ratio within a round. Prefetched
batches make both rates a little high, alike for every path.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE_SIZE = 224
CLASSES = 10


def photo(height: int, width: int, seed: int, noise: float = 10.0) -> torch.Tensor:
    """A uint8 (3, H, W) image with smooth colour regions and grain, which JPEG compresses
    about as it does a photo (not a flat colour, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.zeros(1, 3, height // 8 + 1, width // 8 + 1)
    for cells, amplitude in ((3, 80.0), (12, 40.0)):
        field = torch.rand(1, 3, cells, cells, generator=g) * 2 - 1
        coarse += amplitude * F.interpolate(field, size=coarse.shape[-2:], mode="bilinear", align_corners=False)
    coarse += 25 * torch.randn(coarse.shape, generator=g)
    image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    image += torch.rand(3, 1, 1, generator=g) * 120 + 60
    image += noise * torch.randn(3, height, width, generator=g)
    return image.clamp(0, 255).to(torch.uint8)


def _write_one(job: tuple[str, int, int, int]) -> int:
    from torchvision.io import encode_jpeg

    torch.set_num_threads(1)
    path, height, width, seed = job
    data = encode_jpeg(photo(height, width, seed), quality=90)
    Path(path).write_bytes(data.numpy().tobytes())
    return data.numel()


def make_jpeg_folder(root: Path, images: int, val_per_class: int = 2, seed: int = 0) -> tuple[int, float]:
    """``root/{train,val}/<class>/*.JPEG``, ``images`` training files; (files, mean bytes)."""
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for split, count in (("train", images), ("val", val_per_class * CLASSES)):
        for i in range(count):
            folder = root / split / f"n{i % CLASSES:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            height = int(torch.randint(300, 421, (1,), generator=g))
            width = int(torch.randint(350, 501, (1,), generator=g))
            if i % 3 == 0:  # a third in portrait orientation
                height, width = width, height
            jobs.append((str(folder / f"{split}_{i:06d}.JPEG"), height, width, seed * 10**6 + len(jobs)))
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        sizes = pool.map(_write_one, jobs, chunksize=16)
    return images, sum(sizes[:images]) / images


def folder_ready(root: Path, images: int) -> bool:
    train = root / "train"
    return train.is_dir() and (root / "val").is_dir() and sum(1 for _ in train.rglob("*.JPEG")) == images


# --------------------------------------------------------------------------------------------- paths
def seed_loader(root: Path, workers: int, batch_size: int):
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    dataset = datasets.ImageFolder(str(root / "train"),
                                   transform=transforms.Compose([transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)),
                                                                 transforms.ToTensor()]))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    return loader, lambda batch: batch[0]


def vitlab_datamodule(root: Path, workers: int, batch_size: int, **options):
    from vitlab.data.imagefolder import ImageFolderDataModule

    dm = ImageFolderDataModule(root=str(root), image_size=IMAGE_SIZE, channels=3, mean=[0.5] * 3, std=[0.5] * 3,
                               in_memory=False, scale=(0.05, 1.0), num_workers=workers, batch_size=batch_size,
                               **options)
    dm.setup("fit")  # no trainer: one process, rank 0
    return dm


def vitlab_loader(root: Path, workers: int, batch_size: int):
    dm = vitlab_datamodule(root, workers, batch_size)
    return dm.train_dataloader(), lambda batch: batch[0]


def shards_module():
    """``vitlab.data.shards`` if it exists in this checkout, else None."""
    if importlib.util.find_spec("vitlab.data.shards") is None:
        return None
    import vitlab.data.shards as shards

    return shards


def shards_loader_factory(root: Path, shard_dir: Path):
    """A ``(workers, batch_size) -> (loader, finish)`` for data=shards written from ``root``'s
    files, or the reason it cannot be built."""
    shards = shards_module()
    if shards is None:
        return "src/vitlab/data/shards.py does not exist in this checkout"
    if not all(hasattr(shards, name) for name in ("write_shards", "ShardsDataModule")):
        return "vitlab.data.shards has no write_shards and ShardsDataModule"
    if not (shard_dir / "vitlab.json").is_file():
        start = time.perf_counter()
        # Chunks of 4 MB instead of 64: several per worker even for this small folder, as
        # ImageNet's 138 GiB in 64 MB chunks gives them.
        shards.write_shards(vitlab_datamodule(root, 0, 32), str(shard_dir), num_workers=os.cpu_count(), seed=0,
                            chunk_bytes="4MB")
        print(f"wrote the shards to {shard_dir} in {time.perf_counter() - start:.0f} s")

    def factory(workers: int, batch_size: int):
        dm = shards.ShardsDataModule(root=str(shard_dir), image_size=IMAGE_SIZE, channels=3, mean=[0.5] * 3,
                                     std=[0.5] * 3, scale=(0.05, 1.0), num_workers=workers, batch_size=batch_size)
        dm.setup("fit")
        return dm.train_dataloader(), lambda batch: batch[0]

    return factory


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (/proc/<pid>/stat), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_cpu() -> float:
    """CPU seconds of this process and of its live children (the loader's workers)."""
    me = os.getpid()
    total = process_cpu(me)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                parent = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if parent == me:
                total += process_cpu(int(entry.name))
    return total


def epoch_rate(make, workers: int, batch_size: int) -> tuple[float, float]:
    """One epoch of a fresh loader, from the moment every worker has delivered its first batch
    to the last batch: (images/s of wall time, images per CPU-second of the main process and
    the workers)."""
    loader, finish = make(workers, batch_size)
    skip, last = max(workers, 1), len(loader) - 1
    count, start, cpu = 0, None, None
    for i, batch in enumerate(loader):
        images = finish(batch)
        if i == skip - 1:
            start, cpu = time.perf_counter(), loader_cpu()
        elif i >= skip:
            count += len(images)
        if i == last:  # read before the workers of a one-epoch loader exit
            seconds, cpu = time.perf_counter() - start, loader_cpu() - cpu
    del loader, finish
    gc.collect()
    return count / seconds, count / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="folder of JPEGs (written there if absent); default: a temp dir")
    parser.add_argument("--images", type=int, default=512, help="training JPEGs to generate")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    temp = None
    root = args.root
    if root is None:
        temp = Path(tempfile.mkdtemp(prefix="vitlab_bench_data_"))
        root = temp / "jpegs"
    try:
        if folder_ready(root, args.images):
            sizes = [p.stat().st_size for p in (root / "train").rglob("*.JPEG")]
            print(f"using {root}: {len(sizes)} JPEGs, {sum(sizes) / len(sizes) / 1024:.0f} KiB on average")
        else:
            start = time.perf_counter()
            count, mean_bytes = make_jpeg_folder(root, args.images)
            print(f"wrote {count} JPEGs (350-500 x 300-420 px, quality 90, {mean_bytes / 1024:.0f} KiB on average) "
                  f"to {root} in {time.perf_counter() - start:.0f} s")

        paths = {"seed": lambda w, b: seed_loader(root, w, b), "vitlab": lambda w, b: vitlab_loader(root, w, b)}
        shards = shards_loader_factory(root, (temp or root.parent) / f"{root.name}_shards")
        if isinstance(shards, str):
            print(f"shards: skipped ({shards})")
        else:
            paths["shards"] = shards
        rates = {(name, w): [] for name in paths for w in args.workers}
        cpu_rates = {(name, w): [] for name in paths for w in args.workers}
        start = time.perf_counter()
        for r in range(args.rounds):
            for w in args.workers:
                for name, make in paths.items():
                    wall, cpu = epoch_rate(make, w, args.batch_size)
                    rates[name, w].append(wall)
                    cpu_rates[name, w].append(cpu)
            line = "  ".join(f"{name}/{w}w {rates[name, w][-1]:.0f} ({cpu_rates[name, w][-1]:.0f})"
                             for w in args.workers for name in paths)
            print(f"round {r + 1}/{args.rounds}: {line} images/s (per CPU-second)", flush=True)

        def within(table, name, w):
            return [a / b for a, b in zip(table[name, w], table["seed", w])]

        print(f"\n{IMAGE_SIZE} px training batches of {args.batch_size} from {args.images} JPEGs, "
              f"{args.rounds} rounds, {time.perf_counter() - start:.0f} s, {os.cpu_count()} cores")
        print("images/s: wall clock (depends on what else the machine runs); images/CPU-s: per second of CPU "
              "time of the main process and the workers (what one core given to the loader delivers)")
        print(f"{'path':<8} {'workers':>7} {'images/s':>9} {'per worker':>10} {'/seed':>6} {'images/CPU-s':>12} "
              f"{'/seed':>6} {'rounds':>10}")
        for name in paths:
            for w in args.workers:
                wall, cpu = statistics.median(rates[name, w]), statistics.median(cpu_rates[name, w])
                ratio, cpu_ratio, spread = "", "", ""
                if name != "seed":
                    ratio = f"{statistics.median(within(rates, name, w)):.2f}x"
                    cpu_within = within(cpu_rates, name, w)
                    cpu_ratio = f"{statistics.median(cpu_within):.2f}x"
                    spread = f"{min(cpu_within):.2f}-{max(cpu_within):.2f}"
                print(f"{name:<8} {w:>7} {wall:>9.0f} {wall / w:>10.0f} {ratio:>6} {cpu:>12.0f} {cpu_ratio:>6} "
                      f"{spread:>10}")
        for name in paths:
            if name != "seed":
                for w in args.workers:
                    print(f"{name}/seed = {statistics.median(within(cpu_rates, name, w)):.2f}x per CPU-second, "
                          f"{statistics.median(within(rates, name, w)):.2f}x wall, with {w} worker{'s' * (w > 1)}")
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
