#!/usr/bin/env bash
# Calibration sweep of the VS loss weights on full MNIST (the paper's MLP pair), run on a lent GPU so a
# dozen settings fit in minutes; the chosen setting is then benchmarked on the CPU by reproduce.py.
# Usage (repo root, data/raw holding the MNIST archive): OUT=dir bash benchmarks/gpu_sweep.sh [EPOCHS]
set -euo pipefail
EPOCHS=${1:-60}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
W=${WORK:-/tmp/vs-sweep}
COMMON=(--set distill.converge_tol=0 --set runtime.progress=false --set tracking.enabled=false ${EXTRA:-})
python3 -m varstudent.cli prepare --out "$W" "${COMMON[@]}"
python3 -m varstudent.cli teacher --out "$W" --set teacher.epochs="$EPOCHS" "${COMMON[@]}"
mkdir -p "$W/ablation" && ln -sfn "$W/prepare" "$W/ablation/prepare" && ln -sfn "$W/teacher" "$W/ablation/teacher"
variants=(
  "sparse_vd:distill.kd_weight=0,distill.bsr_weight=0"
  "kd1_vd1:distill.kd_weight=1"
  "kd03_vd1:distill.kd_weight=0.3"
  "kd01_vd1:distill.kd_weight=0.1"
  "kd03_vd3:distill.kd_weight=0.3,distill.vd_weight=3"
  "kd1_vd3:distill.kd_weight=1,distill.vd_weight=3"
  "kd03_vd3_T2:distill.kd_weight=0.3,distill.vd_weight=3,distill.temperature=2"
  "kd1_vd10:distill.kd_weight=1,distill.vd_weight=10"
  "kd03_vd3_bsr1e3:distill.kd_weight=0.3,distill.vd_weight=3,distill.bsr_weight=0.001"
  "kd03_vd3_bsrin:distill.kd_weight=0.3,distill.vd_weight=3,distill.bsr_weight=0.001,distill.bsr_blocks=in"
  "kd01_vd2:distill.kd_weight=0.1,distill.vd_weight=2"
  "kd05_vd5:distill.kd_weight=0.5,distill.vd_weight=5"
)
for v in "${variants[@]}"; do
  python3 benchmarks/reproduce.py mnist-mlp --set teacher.epochs="$EPOCHS" --set distill.epochs="$EPOCHS" \
    --out "$W/ablation" --reuse-teacher --only \
    --variant "$v" "${COMMON[@]}" > "$W/${v%%:*}.log" 2>&1 &
done
wait
grep -h "error at" "$W"/*.log | sort -t: -k1,1 | tee "${OUT:-$W}/sweep.txt"
