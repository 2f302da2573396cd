#!/usr/bin/env bash
# A/B of several builds of libqattn in one GPU call, within the device's
# 64 MiB working-tree limit: each build travels as a gzip'd kit (~4.5 MiB for
# a library-only kit, ~15 MiB with the test programs).
#
# On the build machine, per build (the first one named below also needs its
# tests/test_conformance; the others only libqattn.so*):
#   bench/gpu-kit.sh build-gpu gpu-kit-NAME && tar -czf gpu-kits/NAME.tgz gpu-kit-NAME
# On the GPU machine (carry [".devkit", "gpu-kits"]):
#   . .devkit/env.sh && bash bench/gpu-ab.sh NEW OLD [MORE...]
# Runs, each section capped: the CUDA conformance suite of NEW with the
# persistent kernels' grid capped at 2 CTAs (QATTN_CUDA_MAX_CTAS, ignored by
# builds without it) and then uncapped; compare.py (torch SDPA flash and cuDNN
# beside qattn) for each build; kernel_times.py for each build. Settings:
# N (compare.py sequence lengths, default 4096,16384), MODES (exact,int8_fp8),
# CAUSAL (both). Logs go to $OUT/ab.
set -o pipefail
[[ $# -ge 1 ]] || { echo "usage: bench/gpu-ab.sh NEW [OLD...]" >&2; exit 2; }
O=${OUT:-/tmp/qattn-ab}/ab
mkdir -p "$O"
for k in "$@"; do tar -xzf "gpu-kits/$k.tgz" || exit; done
export PYTHONUNBUFFERED=1
date -u
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
new=gpu-kit-$1
for ctas in 2 ""; do
  echo "== conformance $1 ${ctas:+(QATTN_CUDA_MAX_CTAS=$ctas)}"
  QATTN_CUDA_MAX_CTAS=$ctas timeout 150 "$new/tests/test_conformance" cuda > "$O/tests${ctas:+_ctas$ctas}.log" 2>&1
  echo "rc=$?"
  grep -E "^\[  (PASSED|FAILED|SKIPPED) \]" "$O/tests${ctas:+_ctas$ctas}.log"
done
for k in "$@"; do
  echo "== compare.py $k"; date -u
  timeout 200 python3 bench/compare.py --library "$PWD/gpu-kit-$k/libqattn.so.0" --d 128 --n "${N:-4096,16384}" \
    --causal "${CAUSAL:-both}" --modes "${MODES:-exact,int8_fp8}" --json "$O/compare_$k.json" \
    --markdown "$O/compare_$k.md" > "$O/compare_$k.log" 2>&1
  echo "rc=$?"
  cat "$O/compare_$k.md"
done
for k in "$@"; do
  echo "== kernel_times.py $k"
  QATTN_LIBRARY=$PWD/gpu-kit-$k/libqattn.so.0 timeout 90 python3 bench/kernel_times.py --d 128 --n 4096,16384 \
    --modes int8_fp8,int8_fp16,exact > "$O/kernel_times_$k.md" 2> "$O/kernel_times_$k.err"
  echo "rc=$?"
  cat "$O/kernel_times_$k.md"
done
date -u
