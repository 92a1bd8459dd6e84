"""Why timm's ViT trains slower than vitlab's SimpleViT on a CPU: one training step of each, in one process.

    python scripts/bench_timm_vit.py                    # bf16 autocast, the default model's size
    python scripts/bench_timm_vit.py --threads 1 --precision fp32
    python scripts/bench_timm_vit.py --profile 12       # and the top operators of one step of each

Contenders, all at the size of ``conf/model/simple_vit.yaml`` (width 128, depth 6, 4 heads x 32,
MLP 256, patch 4 on 28x28x1 Fashion-MNIST-shaped batches), each a training step (forward,
cross-entropy, backward, fused AdamW step) under ``torch.autocast("cpu", bfloat16)``:

- ``simple_vit:auto``: vitlab's SimpleViT as it trains on a CPU (explicit attention in batch slices);
- ``simple_vit:sdpa``: the same with ``attention=sdpa`` (``F.scaled_dot_product_attention``);
- ``timm:sdpa``: timm's ``VisionTransformer`` as ``scripts/benchmark.py`` builds it (mean pooling, no
  class token, no qkv bias), with timm's default ``fused_attn`` (SDPA);
- ``timm:math``: the same with ``fused_attn`` off on every attention module (timm's explicit
  ``softmax(q k^T) v``; what ``model=timm`` runs on a CPU, ``model.attention: auto``);
- ``deit:sdpa``, ``deit:math``: the DeiT-style ViT of ``experiment=ablation/vs_deit`` at this size
  (class token, learned position embedding, qkv bias).

After ``--warmup`` steps each, the contenders take turns one step at a time for ``--rounds``
rounds, so that a shared machine's bursts hit all alike. Reported: the images/s of each from its
median step time, and its ratio to the first contender (``simple_vit:auto`` by default) as the
median over rounds of the ratio within a round, with the quartiles of those ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from vitlab.models import SimpleViT
from vitlab.models.timm_model import set_attention

SIZE = {"dim": 128, "depth": 6, "heads": 4, "dim_head": 32, "mlp_dim": 256, "patch_size": 4}
CONTENDERS = ("simple_vit:auto", "simple_vit:sdpa", "timm:sdpa", "timm:math", "deit:sdpa", "deit:math")


def build(name: str) -> torch.nn.Module:
    """The network of a contender, ``<network>:<attention>``."""
    network, _, attention = name.partition(":")
    torch.manual_seed(0)
    if network == "simple_vit":
        return SimpleViT(image_size=28, channels=1, num_classes=10, attention=attention, **SIZE)
    from timm.models.vision_transformer import VisionTransformer

    deit = network == "deit"
    model = VisionTransformer(img_size=28, patch_size=SIZE["patch_size"], in_chans=1, num_classes=10,
                              embed_dim=SIZE["dim"], depth=SIZE["depth"], num_heads=SIZE["heads"],
                              mlp_ratio=SIZE["mlp_dim"] / SIZE["dim"], qkv_bias=deit, class_token=deit,
                              global_pool="token" if deit else "avg")
    return set_attention(model, attention)


class Contender:
    def __init__(self, name: str, x: torch.Tensor, y: torch.Tensor):
        self.name, self.x, self.y = name, x, y
        self.model = build(name).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-3, weight_decay=0.05, fused=True)
        self.rates: list[float] = []

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.x), self.y, label_smoothing=0.1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def run(self, steps: int, bf16: bool, timed: bool = True) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            start = time.perf_counter()
            for _ in range(steps):
                self.step()
            if timed:
                self.rates.append(len(self.x) * steps / (time.perf_counter() - start))


def profile(c: Contender, bf16: bool, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        c.step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            c.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    attention = sum(e.self_cpu_time_total for e in events
                    if "scaled_dot_product" in e.key or "flash_attention" in e.key or "softmax" in e.key
                    or e.key in ("aten::bmm", "aten::baddbmm"))
    print(f"\n--- {c.name}: one step {total / 1e3:.1f} ms of operator time; attention kernels (SDPA, softmax, "
          f"bmm and their backward) {100 * attention / total:.1f} % ---")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds of one step of each contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each contender first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="before timing, profile one step of each contender and print its top operators")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = args.precision == "bf16"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.precision}, batch {args.batch_size}, "
          f"load average {os.getloadavg()[0]:.1f}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=gen)
    y = torch.randint(10, (args.batch_size,), generator=gen)
    contenders = [Contender(name, x, y) for name in args.contenders]
    for c in contenders:
        print(f"{c.name}: {sum(p.numel() for p in c.model.parameters()):,} parameters")
    if args.profile:
        for c in contenders:
            profile(c, bf16, args.profile)
    for c in contenders:
        c.run(args.warmup, bf16, timed=False)
    started = time.perf_counter()
    for r in range(args.rounds):
        for c in contenders:
            c.run(1, bf16)
        if (r + 1) % 5 == 0 or r + 1 == args.rounds:
            print(f"round {r + 1}/{args.rounds}: {time.perf_counter() - started:.0f} s, load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    if not args.rounds:
        return
    ref = contenders[0]
    print(f"\n{'contender':<16} {'images/s':>9} {'vs ' + ref.name + ' (quartiles)':>38}")
    for c in contenders:
        ratios = [a / b for a, b in zip(c.rates, ref.rates)]
        low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        print(f"{c.name:<16} {statistics.median(c.rates):9.1f} "
              f"{statistics.median(ratios):>24.2f}x ({low:.2f}-{high:.2f})")


if __name__ == "__main__":
    main()
