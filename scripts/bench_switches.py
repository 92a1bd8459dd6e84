"""Training speed of each design-space switch against the default model, in one process.

    python scripts/bench_switches.py [--rounds 5] [--steps 12] [--threads N] [--precision bf16-mixed]
                                     [--only SWITCH ...]

The default SimpleViT (patch 4, width 128, depth 6, 4 x 32 heads, MLP 256, batch 128 of 28 px
one-channel images) and one copy per switch, each trained by the same bare step (forward,
cross-entropy, backward, fused AdamW) on the same random batches, in interleaved rounds: every
round runs each model back to back, so the machine's drift cancels in the ratios. Prints, per
switch, the median images/s and the median over rounds of its ratio to the default within the
round. Speed targets belong here, never in tests.

``--reference FILE`` adds the default model as another version of ``simple_vit.py`` defines it
(e.g. ``git show <commit>:src/vitlab/models/simple_vit.py > /tmp/old_vit.py``): a change to the
model checked for speed against the code before it, in the same rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from functools import partial

import torch

from benchmark import Contender, bare_loop
from vitlab.config import auto_precision
from vitlab.models import SimpleViT

DEFAULT = dict(image_size=28, patch_size=4, channels=1, num_classes=10, dim=128, depth=6, heads=4, dim_head=32,
               mlp_dim=256)
#: The switches as ``python -m vitlab.train model.<field>=<value>`` sets them.
SWITCHES = {
    "default": {},
    "reg_tokens=4": {"reg_tokens": 4},
    "qk_norm=true": {"qk_norm": True},
    "layer_scale=1e-5": {"layer_scale": 1e-5},
    "pos_emb=rope2d_axial": {"pos_emb": "rope2d_axial"},
    "pos_emb=rope2d_mixed": {"pos_emb": "rope2d_mixed"},
    "pos_emb=sincos2d+rope2d_mixed": {"pos_emb": "sincos2d+rope2d_mixed"},
    "mlp=swiglu": {"mlp": "swiglu"},
    "patch_dropout=0.5": {"patch_dropout": 0.5},
    "pool=map": {"pool": "map"},
    "patch_norm=false": {"patch_norm": False},
    "flexi_patch_sizes=[4,7,14]": {"patch_norm": False, "flexi_patch_sizes": [4, 7, 14]},
}


def flexi_model(model: SimpleViT):
    """FlexiViT trains each step at a patch size drawn from its list (as ``vitlab.module`` does)."""
    step = [0]

    def forward(x):
        from vitlab.module import flexi_patch_size

        step[0] += 1
        return SimpleViT.forward(model, x, patch_size=flexi_patch_size(model.flexi_patch_sizes, 0, step[0]))

    model.forward = forward
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per switch and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default=None, help="bf16-mixed or 32-true (default: vitlab's auto choice)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--only", nargs="+", default=None, choices=list(SWITCHES)[1:], metavar="SWITCH",
                        help="time these switches only (beside the default), e.g. --only pos_emb=rope2d_axial")
    parser.add_argument("--reference", default=None, help="a simple_vit.py whose SimpleViT runs as 'reference'")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or auto_precision()
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 1, 28, 28, generator=gen),
                torch.randint(0, 10, (args.batch_size,), generator=gen)) for _ in range(4)]
    optimizer = partial(torch.optim.AdamW, lr=1e-3, fused=True)
    contenders = []
    for name, switch in SWITCHES.items():
        if args.only and name != "default" and name not in args.only:
            continue
        torch.manual_seed(0)
        model = SimpleViT(**DEFAULT, **switch)
        if switch.get("flexi_patch_sizes"):
            model = flexi_model(model)
        contenders.append(Contender(name, bare_loop(model, batches, device, precision, optimizer), args.batch_size,
                                    0.0, lambda: None))
    if args.reference:
        spec = importlib.util.spec_from_file_location("reference_vit", args.reference)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        contenders.insert(1, Contender("reference", bare_loop(module.SimpleViT(**DEFAULT), batches, device, precision,
                                                              optimizer), args.batch_size, 0.0, lambda: None))
    print(f"{len(contenders)} models, {args.rounds} rounds of {args.steps} steps, batch {args.batch_size}, {precision}, "
          f"{torch.get_num_threads()} threads")
    for _ in range(args.rounds):
        for c in contenders:
            c.run(args.warmup, args.steps)
    base = contenders[0]
    print(f"{'switch':32} {'images/s':>9} {'vs default':>11} {'rounds':>15}")
    for c in contenders:
        ratios = [r / b for r, b in zip(c.rates, base.rates)]
        print(f"{c.name:32} {statistics.median(c.rates):9.0f} {statistics.median(ratios):10.2f}x "
              f"{min(ratios):6.2f}-{max(ratios):.2f}x")


if __name__ == "__main__":
    main()
