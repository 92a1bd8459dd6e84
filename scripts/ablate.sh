#!/usr/bin/env bash
# Run one paper-style ablation over 3 seeds and refresh docs/ablations.md:
#
#   scripts/ablate.sh <name> [extra Hydra overrides]     # name: patch_size pos_emb pool depth_width heads
#                                                        # registers qk_norm layer_scale rope mlp patch_dropout
#                                                        # map_pool patch_norm flexivit vs_deit
#   scripts/ablate.sh all                                # every ablation, one after another
#   scripts/ablate.sh pos_emb data=cifar10 trainer=gpu   # on CIFAR-10: outputs/multirun/ablation_pos_emb_cifar10/
#   scripts/ablate.sh pos_emb trainer.max_epochs=10 trainer.precision=32-true
#                                                        # 10 epochs: outputs/multirun/ablation_pos_emb_10ep/
#                                                        # (every 10-epoch table runs in fp32, as its first jobs did)
#   scripts/ablate.sh patch_size_32 data=cifar10 ...     # patch 2/4/8/16 for 32 px images
#
# The sweep goes to outputs/multirun/ablation_<name>/ (a fixed folder: re-running skips the
# completed jobs and resumes the others), two jobs at a time with one thread each (the joblib
# launcher; pass hydra.launcher.n_jobs=N to change that). The sweep's own summary (summary.md,
# summary.csv, plots) is written into that folder; then docs/ablations.md and its figures
# (with the position-embedding similarity figure for pos_emb) are regenerated, and the records
# of every completed job are kept in docs/ablations/runs/<sweep>/ (commit them: a restart in a
# new checkout copies them back and skips those jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
ABLATIONS=(patch_size patch_size_compute pos_emb pool depth_width heads registers qk_norm layer_scale rope mlp patch_dropout map_pool patch_norm flexivit vs_deit)
if [[ $# -lt 1 ]]; then
  echo "usage: scripts/ablate.sh <name|all> [overrides...]; names: ${ABLATIONS[*]}" >&2
  exit 2
fi
name=$1
shift
if [[ $name == all ]]; then
  names=("${ABLATIONS[@]}")
elif [[ -f conf/experiment/ablation/$name.yaml && $name != base && $name != */* ]]; then
  names=("$name")
else
  echo "error: unknown ablation '$name': choose one of ${ABLATIONS[*]} or all (configs in conf/experiment/ablation/)." >&2
  exit 2
fi
# Another dataset (data=cifar10) or length (trainer.max_epochs=10) gets its own folders
# (ablation_pos_emb_cifar10, ablation_pos_emb_10ep), so that its jobs are never taken for the
# completed jobs of the 1-epoch Fashion-MNIST sweep of the same name.
suffix="" explicit=""
for arg in "$@"; do
  if [[ $arg == data=* && $arg != data=fashion_mnist ]]; then suffix="${suffix}_${arg#data=}"; fi
  if [[ $arg == trainer.max_epochs=* && $arg != trainer.max_epochs=1 ]]; then suffix="${suffix}_${arg#*=}ep"; fi
  if [[ $arg == sweep=* ]]; then explicit="${arg#sweep=}"; fi
done
multirun="${VITLAB_OUTPUT_DIR:-outputs}/multirun"
mkdir -p docs/ablations/runs
status=0
for n in "${names[@]}"; do
  sweep="${explicit:-ablation_$n$suffix}"
  # Jobs completed in an earlier checkout (their records, which the report keeps in
  # docs/ablations/runs/) are copied back, so the sweep skips them.
  kept="docs/ablations/runs/$sweep"
  if [[ -d $kept ]]; then mkdir -p "$multirun/$sweep" && cp -rn "$kept/." "$multirun/$sweep/"; fi
  named=()
  [[ -n $explicit ]] || named=("sweep=$sweep")
  # reuse: a job equal to a completed one of another sweep (the base setting that every ablation
  # shares) takes its results instead of training again; reuse=null among the overrides trains it.
  python -m vitlab.train -m "experiment=ablation/$n" launcher=joblib "reuse=$PWD/docs/ablations/runs" "$@" \
    "${named[@]}" || status=$?
done
python scripts/ablation_report.py --multirun "$multirun"
exit $status
