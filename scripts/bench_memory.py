"""Peak memory of one streaming training epoch, on a folder 4x the memory budget and on one a
tenth of that size: streaming should not grow with the dataset.

    python scripts/bench_memory.py                                  # 96 px, budget 0.05 GiB, 2 workers
    python scripts/bench_memory.py --image-size 64 --budget-gb 0.1 --workers 4

A benchmark, never a test. For a budget B and image size S it writes two folders of small
photo-like JPEGs (a little larger than S, so every crop is resized): the large one holds
4 x B of images once decoded (N x 3 x S x S bytes), the small one a tenth of those images.
Each is then read in a fresh process by ``ImageFolderDataModule(in_memory=False)``'s real
training loader (``--workers`` DataLoader workers, the Inception crop and flip, no model): one
epoch, every batch. Reported per folder: the peak resident memory (VmHWM from
/proc/<pid>/status) of the main process and of each worker, their sum (which counts pages the
forked workers share once per process, so it overstates), the peak over the epoch of the
summed proportional set size (Pss, shared pages split between their processes), and the heap
that building the datamodule took per image file (tracemalloc), extrapolated to ImageNet's
1,281,167 training images. The last line reads ``large/small = <ratio>x`` (of the summed
VmHWM); the aim is at most 2x.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import CLASSES, photo  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def _write_one(job: tuple[str, int, int, int]) -> None:
    from torchvision.io import encode_jpeg

    torch.set_num_threads(1)
    path, height, width, seed = job
    Path(path).write_bytes(encode_jpeg(photo(height, width, seed), quality=90).numpy().tobytes())


def make_folder(root: Path, images: int, image_size: int, seed: int = 0) -> None:
    """``root/{train,val}/<class>/*.JPEG``: ``images`` training files of (1.0-1.6) x image_size."""
    if root.is_dir() and sum(1 for _ in (root / "train").rglob("*.JPEG")) == images:
        return
    shutil.rmtree(root, ignore_errors=True)
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for split, count in (("train", images), ("val", CLASSES)):
        for i in range(count):
            folder = root / split / f"n{i % CLASSES:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            height, width = (int(image_size * (1 + 0.6 * float(torch.rand((), generator=g)))) for _ in range(2))
            jobs.append((str(folder / f"{i:07d}.JPEG"), height, width, seed * 10**7 + len(jobs)))
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        pool.map(_write_one, jobs, chunksize=64)


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the DataLoader workers)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def measure(root: Path, image_size: int, budget_gb: float, workers: int, batch_size: int) -> dict:
    """One streaming epoch in this process; the memory figures as a dict."""
    from vitlab.data.imagefolder import ImageFolderDataModule

    options = dict(root=str(root), image_size=image_size, channels=3, mean=[0.5] * 3, std=[0.5] * 3,
                   memory_budget_gb=budget_gb, num_workers=workers, batch_size=batch_size, scale=(0.05, 1.0))
    auto = ImageFolderDataModule(in_memory="auto", **options).streaming
    tracemalloc.start()
    dm = ImageFolderDataModule(in_memory=False, **options)
    dm.setup("fit")  # no trainer: one process, rank 0
    heap, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    images = len(dm.train_set)
    me = os.getpid()
    peak_pss, batches, start = 0, 0, time.perf_counter()
    iterator = iter(dm.train_dataloader())
    for _ in iterator:
        batches += 1
        if batches % 4 == 1:
            peak_pss = max(peak_pss, sum(pss_kib(p) for p in [me, *children(me)]))
    seconds = time.perf_counter() - start
    # The workers persist until the loader goes, so their high-water marks can still be read.
    worker_pids = children(me)
    peak_pss = max(peak_pss, sum(pss_kib(p) for p in [me, *worker_pids]))
    result = {
        "images": images, "decoded_gib": images * 3 * image_size**2 / 2**30, "auto_streams": auto,
        "batches": batches, "seconds": seconds, "main_hwm_mib": status_kib(me, "VmHWM") / 1024,
        "worker_hwm_mib": [status_kib(p, "VmHWM") / 1024 for p in worker_pids],
        "peak_pss_mib": peak_pss / 1024, "heap_bytes_per_image": heap / images,
    }
    result["sum_hwm_mib"] = result["main_hwm_mib"] + sum(result["worker_hwm_mib"])
    del iterator
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--budget-gb", type=float, default=0.05, help="data.memory_budget_gb (GiB)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--root", type=Path, help="where to write the two folders (kept); default: a temp dir")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # one folder, in a fresh process
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.measure:
        print(json.dumps(measure(args.measure, args.image_size, args.budget_gb, args.workers, args.batch_size)))
        return

    per_image = 3 * args.image_size**2
    large = math.ceil(4 * args.budget_gb * 2**30 / per_image)
    sizes = {"large": large, "small": math.ceil(large / 10)}
    temp = None if args.root else Path(tempfile.mkdtemp(prefix="vitlab_bench_memory_"))
    base = args.root or temp
    results = {}
    try:
        for name, images in sizes.items():
            start = time.perf_counter()
            make_folder(base / name, images, args.image_size)
            print(f"{name}: {images} JPEGs in {base / name} ({time.perf_counter() - start:.0f} s to write or check)",
                  flush=True)
        for name in sizes:
            command = [sys.executable, __file__, "--measure", str(base / name), "--image-size", str(args.image_size),
                       "--budget-gb", str(args.budget_gb), "--workers", str(args.workers),
                       "--batch-size", str(args.batch_size)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)

    print(f"\none streaming epoch at {args.image_size} px, batch {args.batch_size}, {args.workers} workers, "
          f"data.memory_budget_gb={args.budget_gb}")
    print(f"{'folder':<6} {'images':>7} {'decoded':>9} {'auto':>9} {'epoch':>6} {'main':>8} {'workers':>15} "
          f"{'sum':>8} {'peak Pss':>9} {'heap/img':>9}")
    for name, r in results.items():
        workers = "+".join(f"{w:.0f}" for w in r["worker_hwm_mib"]) or "-"
        auto = "streams" if r["auto_streams"] else "in memory"
        print(f"{name:<6} {r['images']:>7} {r['decoded_gib']:>7.3f}Gi {auto:>9} {r['seconds']:>5.0f}s "
              f"{r['main_hwm_mib']:>6.0f}Mi {workers:>13}Mi {r['sum_hwm_mib']:>6.0f}Mi {r['peak_pss_mib']:>7.0f}Mi "
              f"{r['heap_bytes_per_image']:>8.0f}B")
    heap = results["large"]["heap_bytes_per_image"]
    print(f"the datamodule's file list: {heap:.0f} B per image, {heap * IMAGENET_TRAIN / 2**20:.0f} MiB for "
          f"ImageNet's {IMAGENET_TRAIN:,} training images (main process)")
    print(f"peak Pss large/small = {results['large']['peak_pss_mib'] / results['small']['peak_pss_mib']:.2f}x")
    print(f"large/small = {results['large']['sum_hwm_mib'] / results['small']['sum_hwm_mib']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
