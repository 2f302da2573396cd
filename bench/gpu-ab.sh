#!/usr/bin/env bash
# A/B of several builds of libqattn in one GPU call (the device's 64 MiB
# working-tree limit: each build travels as a gzip'd kit, ~4.5 MiB for a
# library-only kit, ~30 MiB with the test programs).
#
# On the build machine, per build (the first one named below needs the test
# programs for `tests`; the others only libqattn.so* and bench/):
#   bench/gpu-kit.sh build-gpu gpu-kit-NAME && tar -czf gpu-kits/NAME.tgz gpu-kit-NAME
# On the GPU machine (carry [".devkit", "gpu-kits"]):
#   . .devkit/env.sh && bash bench/gpu-ab.sh NEW OLD [MORE...]
# Sections (AB_SECTIONS, default all): tests (every suite of NEW on cuda,
# vulkan and opencl, through bench/gpu-run.sh), compare (compare.py for each
# build, two rounds alternating so drift shows; COMPARE_ARGS, default --quick),
# decode (a paged-decode row of qattn-decode-bench for each build, two rounds),
# kernels (kernel_times.py for each build). Logs go to $OUT/ab.
set -o pipefail
[[ $# -ge 1 ]] || { echo "usage: bench/gpu-ab.sh NEW [OLD...]" >&2; exit 2; }
O=${OUT:-/tmp/qattn-ab}/ab
mkdir -p "$O"
for k in "$@"; do tar -xzf "gpu-kits/$k.tgz" || exit; done
sections=" ${AB_SECTIONS:-tests compare decode kernels} "
want() { [[ $sections == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
date -u
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv

if want tests; then
  OUT=$O bash bench/gpu-run.sh "gpu-kit-$1" tests
fi
if want compare; then
  for round in 1 2; do
    for k in "$@"; do
      echo "== compare.py $k (round $round)"; date -u
      timeout 200 python3 bench/compare.py --library "$PWD/gpu-kit-$k/libqattn.so.0" ${COMPARE_ARGS:---quick} \
        --json "$O/compare_${k}_$round.json" --markdown "$O/compare_${k}_$round.md" > "$O/compare_${k}_$round.log" 2>&1
      echo "rc=$?"
      cat "$O/compare_${k}_$round.md"
    done
  done
fi
if want decode; then
  for round in 1 2; do
    for k in "$@"; do
      echo "== decode $k (round $round)"
      LD_LIBRARY_PATH=$PWD/gpu-kit-$k timeout 100 "gpu-kit-$k/bench/qattn-decode-bench" --backend cuda --batch 64,1 \
        --ctx 8k,32k --page 16 --dtype f16,fp8 --peak-gbps 4090 --check-seqs 1 2>&1 | grep -vE "^\[decode-bench\]"
      echo "rc=$?"
    done
  done
fi
if want kernels; then
  for k in "$@"; do
    echo "== kernel_times.py $k"
    QATTN_LIBRARY=$PWD/gpu-kit-$k/libqattn.so.0 timeout 90 python3 bench/kernel_times.py --d 128 --n 4096,16384 \
      --modes int8_fp8,int8_fp16,exact > "$O/kernel_times_$k.md" 2> "$O/kernel_times_$k.err"
    echo "rc=$?"
    cat "$O/kernel_times_$k.md"
  done
fi
date -u
