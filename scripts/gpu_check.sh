#!/usr/bin/env bash
# vitlab on a CUDA machine, in one command (about 8 minutes on one H100/H200), as one report:
#
#   bash scripts/gpu_check.sh [--dry-run] [REPORT]        REPORT: outputs/gpu_check.md by default
#
# 1. scripts/benchmark.py at ViT-S/16, 224 px: images/s, model-FLOP utilisation against the
#    measured bf16 matmul peak (full/peak) and the data sheet's;
# 2. the same at CIFAR size (32 px, model=vit_small_32);
# 3. the input pipeline feeding the GPU: streamed 224 px JPEGs decoded on the GPU
#    (data.decode_on=device) under the full training path, and the loader alone;
# 4. a 2-epoch trainer=gpu run of the default experiment (Fashion-MNIST from VITLAB_DATA_DIR).
#
# --dry-run composes every step's config on any machine (no GPU, nothing trained) and checks
# that both benchmark scripts start; tests/test_gpu_check.py runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
REPORT="${1:-outputs/gpu_check.md}"
PY="${PYTHON:-python}"
JPEGS="${TMPDIR:-/tmp}/vitlab_gpu_check_jpegs"
mkdir -p "$(dirname "$REPORT")"

VIT_S=(trainer=gpu data=synthetic data.image_size=224 data.channels=3 data.num_classes=1000 model=vit_s)
CIFAR=(trainer=gpu data=synthetic model=vit_small_32)
FOLDER=(trainer=gpu data=imagefolder "data.root=$JPEGS" data.in_memory=false data.decode_on=device
        data.image_size=224 model=vit_s)
TRAIN=(trainer=gpu trainer.max_epochs=2 name=gpu_check resume=false)

if [[ $DRY == 1 ]]; then
  mkdir -p "$JPEGS/train/a" "$JPEGS/val/a"  # a layout for the folder config to compose against
  "$PY" - "${VIT_S[*]}" "${CIFAR[*]}" "${FOLDER[*]}" "${TRAIN[*]}" <<'EOF'
import sys

from hydra import compose, initialize_config_module

from vitlab.config import CONFIG_MODULE, register_resolvers

register_resolvers()
with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
    for overrides in sys.argv[1:]:
        cfg = compose("train", overrides=overrides.split(), return_hydra_config=True)
        print(f"composed: {overrides} -> {cfg.model.image_size} px, batch {cfg.data.batch_size}, "
              f"{cfg.trainer.accelerator}, {cfg.trainer.precision}")
EOF
  "$PY" scripts/benchmark.py --help > /dev/null
  "$PY" scripts/bench_data.py --help > /dev/null
  echo "dry run: every step composes; on a CUDA machine run: bash scripts/gpu_check.sh"
  exit 0
fi

section() { printf '\n## %s\n\n```\n' "$1" >> "$REPORT"; }
endsection() { printf '```\n' >> "$REPORT"; }
{
  echo "# vitlab GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo '```'
} > "$REPORT"

section "1. benchmark, ViT-S/16 at 224 px"
"$PY" scripts/benchmark.py --device cuda --skip seed --no-memory --rounds 3 --overrides "${VIT_S[@]}" 2>&1 \
  | grep -v -i warning | tail -25 >> "$REPORT" || echo "failed" >> "$REPORT"
endsection

section "2. benchmark, CIFAR size (32 px, model=vit_small_32)"
"$PY" scripts/benchmark.py --device cuda --no-memory --rounds 3 --overrides "${CIFAR[@]}" 2>&1 \
  | grep -v -i warning | tail -25 >> "$REPORT" || echo "failed" >> "$REPORT"
endsection

section "3. input pipeline: streamed JPEGs decoded on the GPU"
"$PY" scripts/bench_data.py --root "$JPEGS" --images 4096 --workers 4 8 --rounds 2 2>&1 | tail -12 >> "$REPORT" \
  || echo "failed" >> "$REPORT"
"$PY" scripts/benchmark.py --device cuda --skip seed timm bare --no-memory --rounds 2 \
  --overrides "${FOLDER[@]}" data.num_workers=8 2>&1 | grep -v -i warning | tail -12 >> "$REPORT" \
  || echo "failed" >> "$REPORT"
endsection

section "4. two epochs of the default experiment, trainer=gpu"
start=$(date +%s)
"$PY" -m vitlab.train "${TRAIN[@]}" 2>&1 | tail -5 >> "$REPORT" || echo "failed" >> "$REPORT"
echo "wall time: $(( $(date +%s) - start )) s" >> "$REPORT"
"$PY" - >> "$REPORT" <<'EOF' || true
from vitlab.rundir import read_metrics

m = read_metrics("outputs/runs/gpu_check")
print({k: m.get(k) for k in ("status", "test/acc", "best_val_acc", "train_images_per_s", "wall_time_s")})
EOF
endsection
echo "report: $REPORT"
