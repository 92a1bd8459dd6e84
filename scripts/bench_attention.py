"""Attention at 49 and 196 tokens on a CPU: each attention path of the default SimpleViT, in one process.

    python scripts/bench_attention.py                       # fp32 and bf16 autocast, patch 4 and 2
    python scripts/bench_attention.py --threads 2 --precisions fp32
    python scripts/bench_attention.py --profile 15 --rounds 0   # top ops of one patch-2 step per path

Contenders: a training step (forward, cross-entropy, backward, fused AdamW step) of the default
model (conf/model/simple_vit.yaml on 28x28x1 Fashion-MNIST-shaped batches) at each patch size,
and the attention op alone (q, k, v of shape (batch, heads, tokens, dim_head) -> out, forward
and backward) at 49 and 196 tokens; for each ``--paths`` value of the model's ``attention``
option and each precision (fp32, or bf16 under ``torch.autocast("cpu")``). All contenders take
turns within each of ``--rounds`` rounds, so a shared machine's drift hits all alike; ratios are
medians over rounds of the ratio within a round, with their range. FLOPs: forward FLOPs of the
reference path (torch's flop counter via ``flops_per_image``; 4 b h n^2 d for the op), training
counted as 3x forward.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from vitlab.models import attention as simple_vit  # CPU_CHUNK_BYTES lives with the attention
from vitlab.models.cost import flops_per_image
from vitlab.models.attention import Attention
from vitlab.models.simple_vit import SimpleViT

DEFAULT_CHUNK = simple_vit.CPU_CHUNK_BYTES
MODEL = {"image_size": 28, "channels": 1, "num_classes": 10, "dim": 128, "depth": 6, "heads": 4, "dim_head": 32, "mlp_dim": 256}


def set_chunk(path: str) -> str:
    """``auto:8`` is attention=auto with CPU_CHUNK_BYTES = 8 MiB; returns the attention value."""
    attention, _, mib = path.partition(":")
    simple_vit.CPU_CHUNK_BYTES = int(float(mib) * 2**20) if mib else DEFAULT_CHUNK
    return attention


class Contender:
    def __init__(self, key: tuple, step, images: int, flops: float, bf16: bool):
        self.key, self.step, self.images, self.flops, self.bf16 = key, step, images, flops, bf16
        self.rates: list[float] = []
        self.faults: list[float] = []

    def run(self, warmup: int, steps: int) -> None:
        set_chunk(self.key[3])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            for _ in range(warmup):
                self.step()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for _ in range(steps):
                self.step()
            elapsed = time.perf_counter() - start
        self.rates.append(self.images * steps / elapsed)
        self.faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps)


def model_step(patch: int, path: str, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = SimpleViT(patch_size=patch, attention=path, **MODEL).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def op_step(tokens: int, path: str, batch: int, bf16: bool):
    """The attention op alone (the model's ``Attention.attend``), forward and backward; q, k, v
    in bf16 under autocast, as the model's qkv projection gives them."""
    attn = Attention(MODEL["dim"], MODEL["heads"], MODEL["dim_head"], attention=path)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, MODEL["heads"], tokens, MODEL["dim_head"])
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=gen)

    def step():
        out = attn.attend(*(t.to(torch.bfloat16 if bf16 else torch.float32) for t in (q, k, v)))
        out.float().backward(grad)

    return step


def profile(step, bf16: bool, rows: int, title: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    print(f"\n--- profile: {title} (one step) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--paths", nargs="+", default=["math", "sdpa", "auto"],
                        help="values of model.attention; auto:MIB sets CPU_CHUNK_BYTES to MIB MiB")
    parser.add_argument("--patches", nargs="+", type=int, default=[4, 2])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--no-op", action="store_true", help="skip the attention op alone")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="before timing, profile one step of the smallest patch for each path and precision")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    b = args.batch_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, batch {b}, load average {os.getloadavg()[0]:.1f}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 1, 28, 28, generator=gen)
    y = torch.randint(10, (b,), generator=gen)

    contenders: list[Contender] = []
    for precision in args.precisions:
        bf16 = precision == "bf16"
        for patch in args.patches:
            tokens = (28 // patch) ** 2
            flops = 3 * flops_per_image(SimpleViT(patch_size=patch, attention="math", **MODEL), 28, 1)
            for path in args.paths:
                contenders.append(Contender((precision, "step", tokens, path), model_step(patch, path.partition(":")[0], x, y), b,
                                             flops, bf16))
            if not args.no_op:
                op_flops = 3 * 4 * MODEL["heads"] * tokens**2 * MODEL["dim_head"]
                for path in args.paths:
                    contenders.append(Contender((precision, "op", tokens, path), op_step(tokens, path.partition(":")[0], b, bf16), b,
                                             op_flops, bf16))
        if args.profile:
            for path in args.paths:
                patch = min(args.patches)
                profile(model_step(patch, set_chunk(path), x, y), bf16, args.profile, f"{precision}, patch {patch}, attention={path}")

    started = time.perf_counter()
    for r in range(args.rounds):
        for c in contenders:
            c.run(args.warmup, args.steps)
        print(f"round {r + 1}/{args.rounds}: {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.1f}",
              flush=True)
    if not args.rounds:
        return

    by_key = {c.key: c for c in contenders}
    print(f"\n{'prec':<5} {'what':<4} {'tokens':>6} {'path':<5} {'images/s':>9} {'min-max':>15} {'GFLOP/s':>8} "
          f"{'faults MiB':>10} {'vs math':>18}")
    for c in contenders:
        rate = statistics.median(c.rates)
        ref = by_key.get((*c.key[:3], "math"))
        vs = spread([a / m for a, m in zip(c.rates, ref.rates)]) if ref and ref is not c else ""
        print(f"{c.key[0]:<5} {c.key[1]:<4} {c.key[2]:>6} {c.key[3]:<5} {rate:9.1f} {min(c.rates):7.1f}-{max(c.rates):<7.1f} "
              f"{c.flops * rate / 1e9:8.1f} {statistics.median(c.faults) * 4096 / 2**20:10.0f} {vs:>18}")
    print("faults MiB: fresh memory paged in per step (minor page faults x 4 KiB)")

    if len(args.patches) >= 2:
        big, small = max(args.patches), min(args.patches)
        few, many = (28 // big) ** 2, (28 // small) ** 2
        print(f"\nslowdown patch {small} ({many} tokens) / patch {big} ({few} tokens): time per image, median over rounds (range)")
        for precision in args.precisions:
            for what in ("step", "op") if not args.no_op else ("step",):
                for path in args.paths:
                    a, z = by_key[(precision, what, few, path)], by_key[(precision, what, many, path)]
                    print(f"{precision:<5} {what:<4} {path:<5} {spread([p / q for p, q in zip(a.rates, z.rates)]):>20}"
                          f"   FLOP ratio {z.flops / a.flops:.2f}x")


if __name__ == "__main__":
    main()
