#!/usr/bin/env bash
# The pre-train -> fine-tune experiment of docs/transfer.md, resumable (re-running skips what
# is complete and continues what was interrupted):
#
#   scripts/transfer.sh [extra Hydra overrides for both steps]
#
# 1. pre-train on MNIST (experiment=transfer/mnist_pretrain) as outputs/runs/transfer_mnist_pretrain/;
# 2. on Fashion-MNIST with 1 000 labels (experiment=transfer/fashion_mnist_1k), the sweep
#    outputs/multirun/transfer_fashion_mnist_1k/: from the MNIST weights (init_from, a new zero
#    head) or from scratch, training everything or the head alone (module.freeze=backbone), 3 seeds;
# 3. fine-tuning with layer-wise learning-rate decay 0.75 (module.layer_decay), 3 seeds:
#    outputs/multirun/transfer_fashion_mnist_1k_layer_decay/;
# 4. each sweep's summary (summary.md) beside its jobs; the records are copied to docs/transfer/runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${VITLAB_OUTPUT_DIR:-outputs}"
python -m vitlab.train experiment=transfer/mnist_pretrain name=transfer_mnist_pretrain torch_threads=1 "$@"
pre="$out/runs/transfer_mnist_pretrain/checkpoints/last.ckpt"
python -m vitlab.train -m experiment=transfer/fashion_mnist_1k sweep=transfer_fashion_mnist_1k launcher=joblib \
  "init_from=$pre,null" module.freeze=none,backbone seed=0,1,2 "$@" || status=$?
python -m vitlab.train -m experiment=transfer/fashion_mnist_1k sweep=transfer_fashion_mnist_1k_layer_decay \
  launcher=joblib "init_from=$pre" module.layer_decay=0.75 seed=0,1,2 "$@" || status=$?
mkdir -p docs/transfer/runs
for sweep in transfer_fashion_mnist_1k transfer_fashion_mnist_1k_layer_decay; do
  python -m vitlab.summarize "$out/multirun/$sweep"
  for job in "$out/multirun/$sweep"/*/; do
    [[ -f $job/metrics.json ]] || continue
    kept="docs/transfer/runs/$sweep/$(basename "$job")"
    mkdir -p "$kept" && cp "$job/metrics.json" "$job/config.yaml" "$kept/"
  done
done
cp "$out/runs/transfer_mnist_pretrain/metrics.json" docs/transfer/pretrain_metrics.json
exit "${status:-0}"
