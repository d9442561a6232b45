#!/usr/bin/env bash
# End-to-end sweeps of issue 8 on an H200: Qwen2.5-7B shape, Q4_0-format weights, three modes
# (unified+skip, unified without skip, one stream per sequence) interleaved in one process.
# Run from the repo root: OUT=dir bash scripts/h200_e2e.sh [seed|scaling|profile]...
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
M=(-m preset:qwen2.5-7b --quant q4_0)
for what in "${@:-seed scaling profile}"; do
  case $what in
    seed)
      python3 -m batchbench "${M[@]}" -c 40000 -b 2048 -ub 512 -npp 0,512,4096,8192 -ntg 32 -npl 2,3 \
        -fa on --ab all --csv "$OUT/e2e-seed.csv" 2>&1 | tee "$OUT/e2e-seed.md" ;;
    scaling)
      python3 -m batchbench "${M[@]}" -c 140000 -npp 4096 -ntg 32 -npl 1,2,4,8,16,32 \
        -fa on --ab all --csv "$OUT/e2e-scaling.csv" 2>&1 | tee "$OUT/e2e-scaling.md" ;;
    profile)
      python3 scripts/profile_step.py 2>&1 | tee "$OUT/e2e-profile.txt" ;;
  esac
done
