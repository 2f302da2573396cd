#!/usr/bin/env bash
# One pass over the Vulkan backend on a GPU machine: device report, the
# conformance suite, accuracy of every precision mode, and timings of the
# cooperative-matrix kernel variants built beside build-vk.
#
# Usage (after `. .devkit/env.sh`, from the project root):
#   bash bench/gpu-vulkan.sh [BUILD_DIR]       # default build-vk
# Variant builds, when present, are timed too: build-vk-t2 (no register
# prefetch), build-vk-t3 (32-key tiles), build-vk-t4 (both), made with
#   meson setup build-vk-tN -Dtests=false -Dc_args='-DQATTN_VK_COOPMAT_BC=32 -DQATTN_VK_COOPMAT_PREFETCH=0'
# Every step has its own time limit so one hang does not eat the others.
set -uo pipefail
build=${1:-build-vk}
bench=$build/bench/qattn-bench
step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
big="--backend vulkan --b 1 --h 16 --n 16384 --d 128 --json"

step "vulkaninfo --summary"
timeout 20 vulkaninfo --summary 2>/dev/null | sed -n '/^Devices/,$p' | head -30

step "qattn-info"
timeout 30 ./$build/tools/qattn-info

if [ -f "$build/tests/test_conformance" ]; then
  step "conformance suite on vulkan"
  QATTN_LOG=error timeout 90 ./$build/tests/test_conformance vulkan > /tmp/vk-conformance.log 2>&1
  echo "exit status $?; $(grep -c '^\[       OK \]' /tmp/vk-conformance.log) cases OK"
  grep -E '^\[  (FAILED|PASSED|SKIPPED) *\]|^conformance' /tmp/vk-conformance.log | head -40
fi

step "accuracy, every mode: B=1 H=16 N=4096 D=128, full and causal"
timeout 40 $bench --backend vulkan --b 1 --h 16 --n 4096 --d 128 --precision all --check-rows 32 --warmup 2 --iters 5 --json
timeout 30 $bench --backend vulkan --b 1 --h 16 --n 4096 --d 128 --causal --precision exact,int8_fp16 --check-rows 32 --warmup 2 --iters 5 --json
step "accuracy: D=64, GQA, NHD, odd N, bf16"
timeout 20 $bench --backend vulkan --b 2 --h 8 --hkv 2 --n 1000 --d 64 --layout nhd --precision exact,int8_fp16 --check-rows 32 --warmup 1 --iters 3 --json
timeout 20 $bench --backend vulkan --b 1 --h 8 --n 2048 --d 128 --dtype bf16 --precision exact --check-rows 16 --warmup 1 --iters 3 --json

step "timing: exact D=128 N=16384 B=1 H=16, cooperative-matrix variants"
for v in $build build-vk-t2 build-vk-t3 build-vk-t4; do
  [ -x "$v/bench/qattn-bench" ] || continue
  echo "--- $v"
  timeout 30 $v/bench/qattn-bench $big --precision exact --check-rows 8 --warmup 5 --iters 20
done
step "timing: causal, D=64, and the scalar kernels"
timeout 30 $bench $big --causal --precision exact --check-rows 8 --warmup 5 --iters 20
timeout 30 $bench --backend vulkan --b 1 --h 32 --n 16384 --d 64 --json --precision exact --check-rows 8 --warmup 5 --iters 20
QATTN_VULKAN_COOPMAT=0 timeout 40 $bench $big --precision exact --check-rows 4 --warmup 1 --iters 3
timeout 40 $bench $big --precision int8_fp16 --check-rows 4 --warmup 1 --iters 3
step done
