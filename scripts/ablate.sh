#!/usr/bin/env bash
# Run one paper-style ablation over 3 seeds and refresh docs/ablations.md:
#
#   scripts/ablate.sh <name> [extra Hydra overrides]     # name: patch_size pos_emb pool depth_width heads
#   scripts/ablate.sh all                                # every ablation, one after another
#
# The sweep goes to outputs/multirun/ablation_<name>/ (a fixed folder: re-running skips the
# completed jobs and resumes the others), two jobs at a time with one thread each (the joblib
# launcher; pass hydra.launcher.n_jobs=N to change that). The sweep's own summary (summary.md,
# summary.csv, plots) is written into that folder; then docs/ablations.md and its figures
# (with the position-embedding similarity figure for pos_emb) are regenerated from all the
# ablation folders present.
set -euo pipefail
cd "$(dirname "$0")/.."
ABLATIONS=(patch_size pos_emb pool depth_width heads)
if [[ $# -lt 1 ]]; then
  echo "usage: scripts/ablate.sh <name|all> [overrides...]; names: ${ABLATIONS[*]}" >&2
  exit 2
fi
name=$1
shift
if [[ $name == all ]]; then
  names=("${ABLATIONS[@]}")
elif [[ -f conf/experiment/ablation/$name.yaml && $name != base ]]; then
  names=("$name")
else
  echo "error: unknown ablation '$name': choose one of ${ABLATIONS[*]} or all (configs in conf/experiment/ablation/)." >&2
  exit 2
fi
status=0
for n in "${names[@]}"; do
  python -m vitlab.train -m "experiment=ablation/$n" launcher=joblib "$@" || status=$?
done
python scripts/ablation_report.py
exit $status
