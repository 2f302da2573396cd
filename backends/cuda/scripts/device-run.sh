#!/usr/bin/env bash
# One GPU session for the CUDA backend (run from the project root after
# `. .devkit/env.sh`, with build-cuda built on the CPU machine): device facts,
# the test suites, qattn-bench correctness and timings, the torch SDPA baseline
# in the same run, resource usage and SASS facts, and an ncu look at one run.
# Usage: device-run.sh [all|tests|bench|torch|sass|ncu]...
B=${B:-build-cuda}
BENCH="./$B/bench/qattn-bench --backend cuda"
what=${*:-all}
has() { [[ " $what " == *" all "* || " $what " == *" $1 "* ]]; }
t() { echo "+ $*"; timeout "${T:-120}" "$@"; echo "(exit $?)"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv
./$B/tools/qattn-info | sed -n '/backend cuda/,/backend vulkan/p'

if has tests; then
  echo "== conformance (cuda)"; T=300 t ./$B/tests/test_conformance cuda
  # (meson test cannot read a build folder made by another meson version: run the binaries)
  echo "== unit tests"; for x in test_api test_quant test_numeric; do [ -x ./$B/tests/$x ] && T=120 t ./$B/tests/$x; done 2>&1 | grep -E "^\+|PASSED|FAILED|^\(exit"
  echo "== paged (cuda)"; T=200 t ./$B/tests/test_paged cuda 2>&1 | grep -E "^\+|PASSED|FAILED|SKIP|^\(exit"
fi

if has bench; then
  echo "== correctness (fp64 reference rows)"
  for args in "--b 2 --n 1000 --h 4 --d 128" "--b 2 --n 777 --h 4 --d 64 --causal" \
              "--b 2 --nq 300 --nk 900 --h 8 --hkv 2 --d 128 --causal" "--b 2 --nq 500 --nk 200 --h 2 --d 64 --causal --layout nhd" \
              "--b 2 --n 1000 --h 4 --d 128 --dtype bf16 --data kbias" "--b 2 --n 1000 --h 4 --d 128 --granularity per_thread --data kbias"; do
    T=60 t $BENCH $args --precision exact,int8_fp16,int8_fp8,int8_fp8_f16acc,auto --check-rows 64 --warmup 1 --iters 3
  done
  echo "== timings (B = 16384 / N, H = 2048 / D, fp16, HND)"
  for d in 128 64; do for n in 4096 16384; do for c in "" "--causal"; do
    T=90 t $BENCH --d $d --n $n $c --precision all --check-rows 4 --warmup 5 --iters 20
  done; done; done
  echo "== timings without the finite check (asynchronous run)"
  T=90 t $BENCH --d 128 --n 16384 --precision all --check-rows 0 --warmup 5 --iters 20 --no-finite-check
  T=90 t $BENCH --d 128 --n 4096 --precision all --check-rows 0 --warmup 5 --iters 20 --no-finite-check
fi

if has torch; then
  echo "== torch SDPA baseline (same run)"
  PYTHONUNBUFFERED=1 T=200 t python3 backends/cuda/scripts/sdpa_baseline.py
fi

if has sass; then
  echo "== SASS per attention kernel: tensor-core instructions and local-memory traffic"
  lib=$(ls $B/libqattn.so* | head -1)
  for arch in sm_80 sm_89 sm_90a; do
    cuobjdump --dump-sass -arch $arch "$lib" 2>/dev/null | awk -v arch=$arch '
      /Function :/ { if (name != "" && name ~ /attention_kernel/) report(); name = $3; delete n; next }
      { if (match($0, /(HMMA|IMMA|QMMA|LDL|STL|F2FP)[.A-Z0-9]*/)) n[substr($0, RSTART, RLENGTH)]++ }
      function report(   k, s) { s = ""; for (k in n) s = s " " k "x" n[k]; print arch " " name ":" s }
      END { if (name ~ /attention_kernel/) report() }'
  done
fi

if has ncu; then
  echo "== ncu: kernel times and speed of light (one run each)"
  for p in int8_fp8 int8_fp16 exact; do
    T=150 t ncu --section SpeedOfLight --section Occupancy --section LaunchStats $BENCH --d 128 --n 4096 --precision $p \
      --check-rows 0 --warmup 0 --iters 1
  done 2>&1 | grep -E "^\+|_kernel|Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Block Limit|Dynamic Shared|^\(exit"
fi
