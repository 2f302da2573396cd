#!/usr/bin/env bash
# One GPU run for the figures in bench/RESULTS.md: conformance on every GPU
# backend, compare.py (torch SDPA flash and cuDNN beside every qattn mode),
# the portable backends at D=128 N=16k, and paged decode beside torch; all in
# the same run. Logs go to $OUT (or /tmp/qattn-gpu-run).
#   bench/gpu-kit.sh build-gpu gpu-kit   # on the build machine (-Dnvcc_archs=90a)
#   bash bench/gpu-run.sh gpu-kit [SECTION...] # on the GPU machine
# Sections (default: all): sass tests compare kernels profile portable decode decode-portable
set -o pipefail
K=${1:-gpu-kit}
shift || true
sections=" ${*:-sass tests compare kernels profile portable decode decode-portable} "
want() { [[ $sections == *" $1 "* ]]; }
O=${OUT:-/tmp/qattn-gpu-run}
mkdir -p "$O" /tmp/qattn-clcache
export PYTHONUNBUFFERED=1 QATTN_LIBRARY=$PWD/$K/libqattn.so.0 QATTN_OPENCL_CACHE=/tmp/qattn-clcache
date -u
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv

if want sass; then
echo "== SASS of the sm_90a wgmma kernels: tensor-core instructions and local memory per kernel"
cuobjdump -sass "$K/libqattn.so.0" 2>/dev/null | awk '
  /Function :/ { name = $3 }
  /GMMA/ { gmma[name]++ } /(LDL|STL)/ { local[name]++ }
  END { for (n in gmma) printf "%-70s GMMA %4d  local-memory ops %d\n", n, gmma[n], local[n] + 0 }' | sort
cuobjdump -sass "$K/libqattn.so.0" 2>/dev/null | grep -oE "[IQH]GMMA\.[0-9A-Z]+\.[A-Z0-9.]+" | sort | uniq -c
fi

if want tests; then
echo "== conformance (full log: tests.log)"
{
  "$K/tools/qattn-info"
  for b in cuda vulkan opencl; do
    echo "### conformance $b"; timeout 240 "$K/tests/test_conformance" $b; echo "rc=$?"
    echo "### workspace $b"; timeout 60 "$K/tests/test_workspace" $b; echo "rc=$?"
    echo "### paged $b"; timeout 120 "$K/tests/test_paged" $b; echo "rc=$?"
    echo "### paged-vs-cpu $b"; timeout 300 "$K/tests/test_paged_vs_cpu" $b; echo "rc=$?"
  done
  if [[ -x $K/tests/test_opencl ]]; then
    echo "### opencl-specific"; timeout 120 "$K/tests/test_opencl"; echo "rc=$?"
  fi
  echo "### api"; "$K/tests/test_api"; echo "rc=$?"
} > "$O/tests.log" 2>&1
grep -E "^### |^\[  (PASSED|FAILED|SKIPPED) \]|^rc=|passed|failed" "$O/tests.log"
fi

if want compare; then
echo "== compare.py (torch SDPA and qattn, TFLOP/s and accuracy)"
timeout 300 python3 bench/compare.py --json "$O/compare.json" --markdown "$O/compare.md" > "$O/compare.log" 2>&1
echo "rc=$?"
cat "$O/compare.md"
fi

if want kernels; then
echo "== device time per kernel of one call (torch profiler): the quantization passes apart from attention"
timeout 200 python3 bench/kernel_times.py --d 128 --n 4096,16384 --modes int8_fp8,int8_fp8_f16acc,int8_fp16,exact \
  > "$O/kernel_times.md" 2> "$O/kernel_times.err"
echo "rc=$?"
cat "$O/kernel_times.md"
fi

if want profile; then
echo "== ncu: every kernel of one qattn_run (B=1 H=16 N=16384 D=128; quantization passes timed apart)"
for prec in ${PROFILE_MODES:-int8_fp8 int8_fp16 exact}; do
  timeout 240 ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    -k 'regex:attention|quant|stats|finalize' --launch-count 8 \
    "$K/bench/qattn-bench" --backend cuda --b 1 --h 16 --n 16384 --d 128 --precision $prec --warmup 0 --iters 1 \
    --check-rows 0 --no-finite-check > "$O/ncu_$prec.txt" 2>&1
  echo "rc=$? ($prec)"
  grep -E "^  [a-zA-Z_:<>0-9, ]+\(|Duration|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Stall|Issue Slots Busy" \
    "$O/ncu_$prec.txt" | head -70
done
fi

if want portable; then
echo "== CUDA, Vulkan, OpenCL at B=1 H=16 N=16384 D=128"
for b in cuda vulkan opencl; do
  timeout 150 "$K/bench/qattn-bench" --backend $b --b 1 --h 16 --n 16384 --d 128 --precision exact,int8_fp16 \
    --check-rows 4 --warmup 3 --iters 10 --no-finite-check
done > "$O/portable.log" 2>&1
grep -E "^(exact|int8|qattn-bench)" "$O/portable.log"
fi

D=$K/bench/qattn-decode-bench
if want decode; then
echo "== paged decode (qattn-decode-bench) and torch (decode_compare.py)"
timeout 170 $D --backend cuda --batch 1,16,64 --ctx 1k,8k,32k --page 16 --dtype f16,fp8,int8 --peak-gbps 4090 \
  --json > "$O/decode_p16.jsonl" 2> "$O/decode_p16.err"
echo "rc=$?"
timeout 120 $D --backend cuda --batch 64,1 --ctx 8k,32k --page 16,1 --dtype f16,fp8 --peak-gbps 4090 \
  --check-seqs 1 > "$O/decode_targets.log" 2>&1
echo "rc=$?"
cat "$O/decode_targets.log"
timeout 120 python3 bench/decode_compare.py --bench $D --qattn-json "$O/decode_p16.jsonl" \
  --json "$O/decode_compare.jsonl" > "$O/decode_compare.log" 2>&1
echo "rc=$?"
cat "$O/decode_compare.log"
fi

if want decode-portable; then
echo "== paged decode on the portable backends (Hq=32 Hkv=8 D=128, pages of 16)"
for b in vulkan opencl; do
  timeout 150 $D --backend $b --batch 1,16,64 --ctx 8k --page 16 --dtype f16,fp8,int8 --peak-gbps 4090 \
    --check-seqs 1 > "$O/decode_$b.log" 2>&1
  echo "rc=$?"
  grep -vE "^\[decode-bench\]" "$O/decode_$b.log"
done
fi
date -u
