"""Training throughput of one model configuration along four paths, in one process.

    python scripts/benchmark.py                      # Fashion-MNIST default, whatever device is there
    python scripts/benchmark.py --threads 1          # the same torch threads for every path
    python scripts/benchmark.py --overrides compile.enabled=true
    python scripts/benchmark.py --no-memory --breakdown   # and where a step's time goes (CPU)
    python scripts/benchmark.py --device cuda --skip seed --overrides trainer=gpu data=synthetic data.image_size=224 model=vit_s

1. seed:    the reference: a plain PyTorch training loop, lucidrains' ``vit_pytorch.SimpleViT`` (explicit
            attention, fp32, torch's default AdamW) fed by torchvision's FashionMNIST dataset with
            per-sample ``ToTensor``/``Normalize`` in a DataLoader.
2. timm:    timm's ``VisionTransformer`` of the same size (mean pooling, no class token, no qkv
            bias), bare loop, vitlab's precision and optimiser.
3. bare:    vitlab's SimpleViT, bare loop, vitlab's fast settings (precision, attention,
            optimiser and ``compile`` as the config resolves them for the device).
4. full:    vitlab's whole path: ``Trainer.fit`` with the real datamodule, the default
            callbacks (checkpoints, throughput) and TensorBoard logging.

Each path takes ``--warmup`` steps, then ``--steps`` timed steps; paths take turns within each
of ``--rounds`` rounds (so drifts of a shared machine hit all alike). Reported: the median
images/s of each path; ratios as the median over rounds of the ratio within each round; forward
FLOPs per image (torch's flop counter), achieved training FLOP/s (3x forward), model-FLOP
utilisation on GPUs with a known peak, and peak memory: GPU max allocated, and the peak RSS of
each path run alone in a fresh process (``--no-memory`` skips that). The device's own dense
bf16 and fp32 matmul peaks are measured in the same rounds, so ``full/peak`` (achieved training
FLOP/s over the measured bf16 peak) compares the path with what this device does at that
moment. The last lines read ``full/peak = <percent>`` and ``full/seed = <ratio>x``.

``--breakdown`` (CPUs) also profiles the bare path's steps with torch's profiler: the share of
step time in matrix products, the FLOP/s those products reach against the measured peak, and
the operators that take the rest. The two figures bound ``full/peak``: at most the products'
own rate, reached only if everything else took no time.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from vitlab.config import CONFIG_MODULE, auto_precision, register_resolvers
from vitlab.models import SimpleViT, flops_per_image
from vitlab.train import compile_network

PATHS = ("seed", "timm", "bare", "full")
#: The profiler's names of dense matrix products (eager and inductor's extern kernels on CPUs).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
              "mkldnn::_linear_pointwise")
#: Dense bf16 peak FLOP/s (no sparsity) by a part of the GPU's name, for model-FLOP utilisation;
#: the first match counts, so longer names come before their prefixes ("L40S" before "L4").
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12,
             "L4": 121e12, "A10": 125e12}


def peak_bf16(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU by its name, or None for one not in PEAK_BF16."""
    return next((peak for part, peak in PEAK_BF16.items() if part in device_name), None)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure_memory(name: str, args) -> float:
    """Peak RSS of one path alone: this script in a fresh process with only that path, a few
    steps (one process holds every path, so its own RSS cannot be split among them)."""
    command = [sys.executable, __file__, "--memory-of", name, "--device", args.device, "--rounds", "1",
               "--warmup", "1", "--steps", "3", "--overrides", *args.overrides]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("peak RSS GiB ")]
    if result.returncode or not lines:
        print(f"memory of {name} not measured:\n{result.stderr[-2000:]}", file=sys.stderr)
        return float("nan")
    return float(lines[-1].split()[-1])


class Contender:
    """One contender: ``step()`` trains on one batch; ``images`` per step."""

    def __init__(self, name, step, images, flops, sync):
        self.name, self.step, self.images, self.flops, self.sync = name, step, images, flops, sync
        self.rates: list[float] = []
        self.rss = float("nan")
        self.gpu_mem = 0.0

    def run(self, warmup: int, steps: int) -> None:
        for _ in range(warmup):
            self.step()
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        self.rates.append(self.images * steps / (time.perf_counter() - start))


def compose_cfg(overrides: list[str], out_dir: str):
    register_resolvers()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    cfg.paths.output_dir = out_dir
    return cfg


def autocast(device: torch.device, precision: str):
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def bare_loop(model, batches, device, precision, optimizer):
    """A minimal training step over an endless cycle of batches; ``optimizer`` builds the
    optimiser from the parameters."""
    model.to(device).train()
    opt = optimizer(model.parameters())
    it = iter(batches)

    def step():
        nonlocal it
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(batches)
            x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def seed_path(cfg, data_dir: Path, tmp: Path, device, batch_size: int) -> tuple:
    """The seed's loop: torchvision dataset, per-sample PIL transforms, fp32 reference model."""
    import torchvision.transforms as T
    from torchvision.datasets import FashionMNIST
    from vit_pytorch import SimpleViT as ReferenceViT

    # torchvision wants to extract the archives next to them: work on a copy, never the data dir.
    shutil.copytree(data_dir / "FashionMNIST" / "raw", tmp / "FashionMNIST" / "raw")
    dataset = FashionMNIST(tmp, train=True, download=True, transform=T.Compose([T.ToTensor(), T.Normalize((0.2860,), (0.3530,))]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2, persistent_workers=True)
    m = cfg.model
    model = ReferenceViT(image_size=m.image_size, patch_size=m.patch_size, num_classes=m.num_classes, dim=m.dim,
                         depth=m.depth, heads=m.heads, mlp_dim=m.mlp_dim, channels=m.channels, dim_head=m.dim_head)
    # fp32, torch.optim.AdamW at 3e-4 (torch's default implementation), batches moved to the
    # device one by one.
    return bare_loop(model, loader, device, "32-true", lambda params: torch.optim.AdamW(params, lr=3e-4)), model


def timm_model(cfg):
    from timm.models.vision_transformer import VisionTransformer

    m = cfg.model
    return VisionTransformer(img_size=m.image_size, patch_size=m.patch_size, in_chans=m.channels,
                             num_classes=m.num_classes, embed_dim=m.dim, depth=m.depth, num_heads=m.heads,
                             mlp_ratio=m.mlp_dim / m.dim, qkv_bias=False, class_token=False, global_pool="avg")


class StepClock(L.Callback):
    """Lets the benchmark drive ``Trainer.fit`` one timed stretch at a time."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per path and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every path (default: torch's own, all cores)")
    parser.add_argument("--skip", nargs="*", default=[], choices=PATHS)
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides of the vitlab config")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS measurement (a process per path)")
    parser.add_argument("--breakdown", action="store_true",
                        help="profile the bare path: time in matrix products and their FLOP/s, the other "
                             "top operators (CPU)")
    parser.add_argument("--memory-of", choices=PATHS, help=argparse.SUPPRESS)  # one path alone, for its peak RSS
    args = parser.parse_args()
    started = time.perf_counter()
    if args.memory_of:
        args.skip = [p for p in PATHS if p != args.memory_of]

    if args.threads:
        torch.set_num_threads(args.threads)
        args.overrides = [f"torch_threads={args.threads}", *args.overrides]
    data_dir = Path(os.environ.get("VITLAB_DATA_DIR", "data"))
    tmp = Path(tempfile.mkdtemp(prefix="vitlab-bench-"))
    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    cfg = compose_cfg([f"trainer.accelerator={accelerator}", "trainer.enable_progress_bar=false",
                       "++trainer.enable_model_summary=false", "callbacks.model_summary=null", *args.overrides],
                      str(tmp / "run"))
    precision = OmegaConf.to_container(cfg.trainer, resolve=True)["precision"]
    batch_size = cfg.data.batch_size
    m = OmegaConf.to_container(cfg.model, resolve=True)
    shape = (m["channels"], m["image_size"], m["image_size"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}, load average {os.getloadavg()[0]:.1f}), torch {torch.__version__}, batch {batch_size}, precision {precision}, model {m}")

    # Ready batches for the bare loops: normalised tensors already on the device.
    gen = torch.Generator().manual_seed(0)
    ready = [(torch.randn(batch_size, *shape, generator=gen).to(device),
              torch.randint(m["num_classes"], (batch_size,), generator=gen).to(device)) for _ in range(8)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    paths: list[Contender] = []

    def flops(model):
        return flops_per_image(model, m["image_size"], m["channels"])

    if "seed" not in args.skip:
        step, model = seed_path(cfg, data_dir, tmp, device, batch_size)
        paths.append(Contender("seed", step, batch_size, flops(model), sync))
    # timm and bare train with vitlab's optimiser settings (conf/optimizer, e.g. fused AdamW).
    optimizer = hydra.utils.instantiate(cfg.optimizer)
    if "timm" not in args.skip:
        model = timm_model(cfg)
        paths.append(Contender("timm", bare_loop(model, ready, device, precision, optimizer), batch_size, flops(model), sync))
    if "bare" not in args.skip:
        torch.manual_seed(0)
        model = SimpleViT(**{k: v for k, v in m.items() if k not in ("_target_", "name")})
        count = flops(model)
        compile_network(model, cfg.get("compile"))
        paths.append(Contender("bare", bare_loop(model, ready, device, precision, optimizer), batch_size, count, sync))
    if "full" not in args.skip:
        paths.append(full_path(cfg, args, batch_size, sync))
    if args.memory_of:
        paths[0].run(args.warmup, args.steps)
        print(f"peak RSS GiB {peak_rss_gib():.3f}")
        return
    loader = loader_path(cfg, device, batch_size, sync)
    # bf16 where the device has bf16 matrix units (a CPU without them emulates it, very slowly).
    bf16 = device.type == "cuda" or auto_precision() == "bf16-mixed"
    dtypes = (torch.bfloat16, torch.float32) if bf16 else (torch.float32,)
    peaks = [matmul_peak(dtype, device, sync) for dtype in dtypes]
    if not args.no_memory:
        for path in paths:
            path.rss = measure_memory(path.name, args)
        print(f"peak memory of each path alone in a fresh process: {time.perf_counter() - started:.0f} s in all so far")

    for _ in range(args.rounds):
        for path in [*paths, loader, *peaks]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            path.run(args.warmup, args.steps)
            if device.type == "cuda":
                path.gpu_mem = max(path.gpu_mem, torch.cuda.max_memory_allocated(device) / 2**30)
    print(f"\n{time.perf_counter() - started:.0f} s in all; load average at the end: {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores (a busy machine makes the figures noisy: compare ratios)")
    if args.breakdown:
        bare = next((p for p in paths if p.name == "bare"), None)
        if device.type != "cpu" or bare is None:
            print("\nbreakdown: skipped (it profiles the bare path on a CPU)")
        else:
            breakdown(bare, max(args.steps, 1), run_peak(peaks, precision))
    report(paths, loader, peaks, device, precision)
    shutil.rmtree(tmp, ignore_errors=True)


def run_peak(peaks: list[Contender], precision: str) -> Contender:
    """The measured matmul peak that the run's precision can reach: bf16 for a bf16 run, fp32 for a
    32-bit one (a CPU without bf16 units runs 32-true and measures fp32 only)."""
    return peaks[0] if precision.startswith("bf16") else peaks[-1]


def breakdown(path: Contender, steps: int, peak: Contender) -> None:
    """Where ``path``'s training steps spend their time on a CPU, by torch profiler's self time
    per operator on the calling thread (intra-op worker threads run inside those operators, so
    the shares add up to the step). Matrix-product FLOPs are the training FLOPs of the table
    (3x forward): the backward of a product costs twice its forward, and the forward count holds
    products only."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            path.step()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        # Inductor's fused kernels run as one call per compiled graph.
        name = "compiled fused kernels" if event.key.startswith("## Call CompiledFxGraph") else event.key
        times[name] = times.get(name, 0.0) + event.self_cpu_time_total / 1e6
    total = sum(times.values())
    matmul = sum(times.pop(name, 0.0) for name in MATMUL_OPS)
    if not matmul:
        print(f"\nbreakdown: no matrix products among the profiled operators ({', '.join(sorted(times)[:8])}, ...); "
              f"MATMUL_OPS in {Path(__file__).name} lists their names")
        return
    rate = 3 * path.flops * path.images * steps / matmul
    best = statistics.median(peak.rates)
    others = ", ".join(f"{name} {t / total:.1%}" for name, t in sorted(times.items(), key=lambda kv: -kv[1])[:8])
    plural = "s" if steps > 1 else ""
    print(f"\nbreakdown of the {path.name} path (torch profiler, {steps} step{plural}, "
          f"{total / steps * 1e3:.1f} ms a step): matrix products {matmul / total:.1%} of the time at "
          f"{rate / 1e9:.0f} GFLOP/s = {rate / best:.1%} of the measured {peak.name} peak; the rest: {others}")


def matmul_peak(dtype: torch.dtype, device, sync) -> Contender:
    """Dense square matmul FLOP/s of ``dtype`` (2 n^3 per product; n = 1024 on a CPU, 8192 on a
    GPU), the device's practical peak for the model's main operation."""
    n = 8192 if device.type == "cuda" else 1024
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    return Contender(f"matmul {str(dtype).removeprefix('torch.')}", lambda: a @ b, 2 * n**3, None, sync)


def loader_path(cfg, device, batch_size, sync) -> Contender:
    """The data pipeline alone: the datamodule's training loader, the copy to the device and
    its batch-wise augmentation and normalisation, as Lightning runs them."""
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    datamodule.trainer = type("Training", (), {"training": True})()  # augment as in training
    loader = datamodule.train_dataloader()
    it = iter(loader)

    def step():
        nonlocal it
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = [t.to(device, non_blocking=True) for t in batch]
        datamodule.on_after_batch_transfer(batch, 0)

    return Contender("loader", step, batch_size, None, sync)


def full_path(cfg, args, batch_size, sync) -> Contender:
    """Trainer.fit on the real datamodule with the default callbacks and logger; each timed
    stretch is a fit of warmup + steps batches continuing the same module. Stretches are
    shorter than an epoch, so validation is off and only training steps are timed."""
    from vitlab.train import build

    clock = StepClock()
    cfg.trainer.limit_val_batches = 0
    datamodule, module, _ = build(cfg)
    path = Contender("full", None, batch_size, flops_per_image(module.net, cfg.data.image_size, cfg.data.channels), sync)

    def run(warmup, steps):
        trainer = stretch_trainer(cfg, clock, warmup + steps)
        clock.times.clear()
        trainer.fit(module, datamodule=datamodule)
        timed = clock.times[warmup - 1:]
        path.rates.append(batch_size * (len(timed) - 1) / (timed[-1] - timed[0]))

    path.run = run
    return path


def stretch_trainer(cfg, clock, max_steps):
    """A fresh Trainer (and callbacks) per stretch, as the config builds it."""
    from vitlab.train import build_trainer

    cfg = cfg.copy()
    cfg.trainer.max_steps = max_steps
    cfg.trainer.max_epochs = -1
    return build_trainer(cfg, extra_callbacks=[clock])


def report(paths: list[Contender], loader: Contender, peaks: list[Contender], device, precision: str) -> None:
    peak = peak_bf16(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    rows = {}
    print(f"\n{'path':<6} {'images/s':>10} {'min-max':>17} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6} {'RSS GiB':>8} {'GPU GiB':>8}")
    for p in paths:
        rate = statistics.median(p.rates)
        rows[p.name] = rate
        achieved = 3 * p.flops * rate if p.flops else None
        mfu = f"{achieved / peak:6.1%}" if achieved and peak else "   n/a"
        print(f"{p.name:<6} {rate:10.1f} {min(p.rates):8.1f}-{max(p.rates):<8.1f} {(p.flops or 0) / 1e9:10.4f} "
              f"{(achieved or 0) / 1e12:8.3f} {mfu} {p.rss:8.2f} {p.gpu_mem:8.2f}")
    print("RSS: peak resident memory of the path alone in a fresh process (the seed's 2 loader workers are "
          "further processes); GPU: max allocated")
    loader_rate = statistics.median(loader.rates)
    model_rate = rows.get("full") or rows.get("bare")
    print(f"\nloader alone: {loader_rate:.0f} images/s" + (f" = {loader_rate / model_rate:.0f}x the model's" if model_rate else ""))
    rates = {p.name: p.rates for p in paths}
    print("measured peaks: " + ", ".join(f"{p.name} {statistics.median(p.rates) / 1e9:.0f} GFLOP/s" for p in peaks)
          + (f" (data sheet bf16: {peak / 1e12:.0f})" if peak else ""))

    def ratio(a: str, b: str, spread: bool = True) -> str:
        """Median over rounds of the ratio within each round (paths of a round ran back to
        back, so a shared machine's drift cancels), with its range over the rounds."""
        if a not in rates or b not in rates:
            return "n/a"
        within = [x / y for x, y in zip(rates[a], rates[b])]
        text = f"{statistics.median(within):.2f}x"
        return f"{text} (rounds {min(within):.2f}-{max(within):.2f})" if spread and len(within) > 1 else text

    print("\nratios: median over rounds of the ratio within each round")
    print(f"full/bare = {ratio('full', 'bare')} (Lightning + data overhead), bare/timm = {ratio('bare', 'timm')}, "
          f"bare/seed = {ratio('bare', 'seed')}")
    full = next((p for p in paths if p.name == "full"), None)
    if full is not None and full.flops:
        # Within each round: the path's achieved FLOP/s over the matmul peak measured beside it.
        top = run_peak(peaks, precision)
        within = [3 * full.flops * rate / best for rate, best in zip(full.rates, top.rates)]
        sheet = f", {3 * full.flops * rows['full'] / peak:.1%} of the data sheet's bf16" if peak else ""
        print(f"full/peak = {statistics.median(within):.1%} of the measured {top.name} peak{sheet}")
    print(f"full/seed = {ratio('full', 'seed', spread=False)}")


if __name__ == "__main__":
    main()
