#!/usr/bin/env bash
# One GPU run for the figures in bench/RESULTS.md: conformance on every GPU
# backend, compare.py (torch SDPA flash and cuDNN beside every qattn mode),
# the portable backends at D=128 N=16k, and paged decode beside torch; all in
# the same run. Logs go to $OUT (or /tmp/qattn-gpu-run).
#   bench/gpu-kit.sh build-gpu gpu-kit   # on the build machine (-Dnvcc_archs=90a)
#   bash bench/gpu-run.sh gpu-kit [SECTION...] # on the GPU machine
# Sections (default: all): sass tests compare kernels profile portable decode decode-portable
# Also not in the default list: sparse (test_sparse on cuda/vulkan/opencl, qattn-bench sparse rows
# beside dense at 32k/128k, compare.py's torch rows at the same shapes; QATTN_CUDA_SPARSE=1 set).
# Nor prune (test_prune on cuda; qattn-decode-bench --select 2k at 32k for batch 1/16/64 with
# decode_compare.py's torch rows, and at 128k batch 16; qattn-prune-bench needles at 100k tokens and
# a 1M-token eviction stream; QATTN_CUDA_PRUNE=1 set).
# Not in the default list: sanitize (about 6 minutes): compute-sanitizer's memcheck, racecheck,
# synccheck and initcheck over every CUDA kernel family at small shapes (the kit's test programs:
# dense in every mode on the sm_90a kernels and, with QATTN_CUDA_WGMMA=0, on the mma.sync ones; the
# quantization passes; paged append, decode, prefill, split-KV and merge; the unchecked paths
# through the bench programs), and the Vulkan suites under the Khronos validation layer the kit
# carries (QATTN_VULKAN_VALIDATION=1). The four tools and the Vulkan run go in parallel, each a
# chain of runs with its own time limit inside one budget (SAN_BUDGET seconds, default 330); logs
# in $OUT/sanitize_<tool>_<family>.log and one summary line per (tool, family):
#   . .devkit/env.sh && bash bench/gpu-run.sh gpu-kit sanitize
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

if want sparse; then
echo "== sparse attention: the shared suite on every GPU backend, then speed beside dense and torch"
export QATTN_CUDA_SPARSE=${QATTN_CUDA_SPARSE:-1}
{
  for b in ${SPARSE_BACKENDS:-cuda vulkan opencl}; do
    echo "### sparse $b"; timeout 150 "$K/tests/test_sparse" $b; echo "rc=$?"
  done
  echo "### sparse cuda mma.sync (QATTN_CUDA_WGMMA=0)"
  QATTN_CUDA_WGMMA=0 timeout 120 "$K/tests/test_sparse" cuda; echo "rc=$?"
} > "$O/sparse_tests.log" 2>&1
grep -E "^### |^\[  (PASSED|FAILED|SKIPPED) \]|^rc=|ERROR" "$O/sparse_tests.log" | head -60
B=$K/bench/qattn-bench
# Block sparsity 0.5 and 0.9 at 32k (ideal 2x and 10x), a 4k window over 128k, prediction at 8k and 32k.
specs=("--n 32768 --blocks 128x128 --keep 0.5" "--n 32768 --blocks 128x128 --keep 0.1"
       "--n 32768 --blocks 64x128 --keep 0.5 --causal" "--n 131072 --window 4095,0 --sinks 4 --causal"
       "--n 8192 --data structured --predict 0.99 --causal" "--n 32768 --data structured --predict 0.99 --causal")
# SPARSE_QUICK=1: three shapes, no 128k prediction, torch at 32k only (a shared run's time box)
[[ ${SPARSE_QUICK:-0} == 1 ]] && specs=("--n 32768 --blocks 128x128 --keep 0.1" \
  "--n 32768 --blocks 64x128 --keep 0.5 --causal" "--n 32768 --data structured --predict 0.99 --causal")
for spec in "${specs[@]}"; do
  echo "### $spec"
  timeout 150 $B --backend cuda --b 1 --h 16 --d 128 --precision exact,int8_fp8 --check-rows 2 --warmup 3 \
    --iters 10 --no-finite-check $spec --json
done > "$O/sparse_bench.jsonl" 2> "$O/sparse_bench.err"
[[ ${SPARSE_QUICK:-0} == 1 ]] || { echo "### --n 131072 --data structured --predict 0.99 --causal" >> "$O/sparse_bench.jsonl"
timeout 150 $B --backend cuda --b 1 --h 16 --d 128 --precision int8_fp8 --check-rows 1 --warmup 2 --iters 5 \
  --no-finite-check --n 131072 --data structured --predict 0.99 --causal --json >> "$O/sparse_bench.jsonl" \
  2>> "$O/sparse_bench.err"; }
echo "rc=$?"
grep -E "^###|sparse" "$O/sparse_bench.jsonl" | cut -c1-400
echo "== torch SDPA beside them (dense, same shapes)"
timeout 200 python3 bench/compare.py --d 128 --n ${SPARSE_TORCH_N:-32768,131072} --causal ${SPARSE_TORCH_CAUSAL:-both} --backends flash,cudnn,qattn \
  --modes exact,int8_fp8 --iters 10 --warmup 3 --ref-heads 1 --json "$O/sparse_torch.json" \
  --markdown "$O/sparse_torch.md" > "$O/sparse_torch.log" 2>&1
echo "rc=$?"
cat "$O/sparse_torch.md"
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

if want prune; then
echo "== decode-time pruning: the shared suite, selection speed beside dense qattn and torch, needles, eviction"
export QATTN_CUDA_PRUNE=${QATTN_CUDA_PRUNE:-1}
P=$K/bench/qattn-prune-bench
{ timeout 90 "$K/tests/test_prune" cuda; echo "rc=$?"; } > "$O/prune_tests.log" 2>&1
grep -E "^\[  (PASSED|FAILED|SKIPPED|  OK|  SKIP) |^\[  ERROR|^rc=|read .* of .* pages|needles|eviction|metadata|page mass|covering" \
  "$O/prune_tests.log" | head -40
# 32k context, budget 2048 tokens, batch 1/16/64 (targets 3x, 6x, 6x over dense), torch beside
timeout 120 $D --backend cuda --batch 1,16,64 --ctx 32k --page 16 --dtype f16 --select 2k --check-seqs 1 \
  --warmup 3 --iters 10 --reps 5 --json > "$O/prune_32k.jsonl" 2> "$O/prune_32k.err"
echo "rc=$?"
timeout 60 python3 bench/decode_compare.py --batch 1,16,64 --ctx 32k --warmup 3 --iters 10 --reps 5 \
  --qattn-json "$O/prune_32k.jsonl" --json "$O/prune_compare.jsonl" > "$O/prune_compare.log" 2>&1
echo "rc=$?"
cat "$O/prune_compare.log"
# retrieval at 100k tokens, 200 trials, budget 1024 (target 99%); adaptive on page-coherent keys
timeout 50 $P needle --backend cuda --ctx 100k --trials 200 --batch 16 --budget 1024 > "$O/needle.log" 2>&1
echo "rc=$?"
timeout 50 $P needle --backend cuda --ctx 100k --trials 200 --batch 16 --budget 64 --adaptive 0.01,1024 \
  --haystack coherent >> "$O/needle.log" 2>&1
echo "rc=$?"
grep -v "^\[prune-bench\]" "$O/needle.log"
# a 1M-token stream under a 4k-token budget
timeout ${PRUNE_EVICT_S:-100} $P evict --backend cuda --tokens 1M --keep-tokens 4096 --hq 32 --hkv 8 \
  --check-every 256 > "$O/evict.log" 2>&1
echo "rc=$?"
cat "$O/evict.log"
# 128k, batch 16 (target 15x needs a two-level bound; this is the one-level scheme)
timeout ${PRUNE_128K_S:-90} $D --backend cuda --batch 16 --ctx 128k --page 16 --dtype f16 --select 2k \
  --check-seqs 0 --warmup 2 --iters 5 --reps 3 > "$O/prune_128k.log" 2>&1
echo "rc=$?"
grep -vE "^\[decode-bench\]" "$O/prune_128k.log"
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
if want sanitize; then
echo "== compute-sanitizer on every CUDA kernel family; the Vulkan suites under the validation layer"
CS=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)}
[[ -x $CS ]] && "$CS" --version | tail -1 || echo "compute-sanitizer not found (set COMPUTE_SANITIZER)"
san_end=$((SECONDS + ${SAN_BUDGET:-330}))
T=$K/tests B=$K/bench
# The test programs' CPU references share the 16 cores between five parallel chains.
export QATTN_LOG=error QATTN_NUM_THREADS=3 OMP_NUM_THREADS=3
# san TOOL FAMILY LIMIT PROGRAM [ARGS...]: one run under the tool (vkval: the Vulkan validation
# layer instead), appended to the family's log, its rc and seconds to the family's .rc file.
# A run gets at most LIMIT seconds and never more than what is left of the budget.
san() {
  local tool=$1 fam=$2 limit=$3
  shift 3
  local log=$O/sanitize_${tool}_$fam.log left=$((san_end - SECONDS)) start=$SECONDS rc envs
  read -ra envs <<< "${SAN_ENV:-}" # split without globbing the filters
  ((limit > left)) && limit=$left
  echo "### ${SAN_ENV:-} $*" >> "$log"
  if ((limit < 10)); then
    echo "not run: the budget is spent" >> "$log"
    echo "skipped" >> "$log.rc"
    return
  fi
  case $tool in
    vkval) timeout -k 10 "$limit" env QATTN_VULKAN_VALIDATION=1 VK_LAYER_PATH="$vklayer" "${envs[@]}" "$@" \
             >> "$log" 2>&1 ;;
    *) local extra=()
       [[ $tool == memcheck ]] && extra=(--leak-check full)
       timeout -k 10 "$limit" env "${envs[@]}" "$CS" --tool "$tool" --error-exitcode 9 --print-limit 100 \
         "${extra[@]}" "$@" >> "$log" 2>&1 ;;
  esac
  rc=$?
  echo "$rc:$((SECONDS - start))s" >> "$log.rc"
}
# Every family under memcheck and synccheck (the faster tools): whole suites, the dense one by
# mode so that a run out of time costs one mode.
san_all() {
  local tool=$1 g
  for g in 'exact*' 'int8_fp16*' 'int8_fp8*' 'auto*' 'nonfinite*'; do
    SAN_ENV="QATTN_TEST_FILTER=$g" san "$tool" dense 75 "$T/test_conformance" cuda
  done
  san "$tool" quant 60 "$T/test_workspace" cuda
  san "$tool" paged 90 "$T/test_paged" cuda
  san "$tool" paged-vs-cpu 90 "$T/test_paged_vs_cpu" cuda 12 8 12
  # The unchecked (graph-capturable) paths: no finite scan, no table check, clamped tables.
  san "$tool" bench 60 "$B/qattn-bench" --backend cuda --precision all --b 1 --h 4 --hkv 2 --n 333 --d 128 \
    --causal --warmup 0 --iters 1 --check-rows 4 --no-finite-check
  san "$tool" bench 60 "$B/qattn-decode-bench" --backend cuda --batch 3 --ctx 300 --page 16 --dtype f16,fp8,int8 \
    --hq 8 --hkv 2 --d 64 --warmup 0 --iters 1 --reps 1 --check-seqs 1
  for g in 'exact*' 'int8_fp16*' 'int8_fp8*'; do
    SAN_ENV="QATTN_CUDA_WGMMA=0 QATTN_TEST_FILTER=$g" san "$tool" dense-mma 60 "$T/test_conformance" cuda
  done
  # The opt-in families: page metadata, selection, page mass; sparse prefill.
  SAN_ENV="QATTN_CUDA_PRUNE=1" san "$tool" prune 90 "$T/test_prune" cuda
  SAN_ENV="QATTN_CUDA_SPARSE=1" san "$tool" sparse 90 "$T/test_sparse" cuda
}
# racecheck and initcheck are slower: a few cases per family, one run each (QATTN_TEST_FILTER).
san_some() {
  local tool=$1 c
  # sm_90a: exact TMA D 64/128/256 (tails, causal, bf16 GQA), INT8_FP16 TMA (more steps than
  # stages), FP8 cp.async (Nk 333), FP8 and F16ACC TMA (tails, GQA, causal).
  for c in exact_d64 exact_d128_causal exact_d256_bf16_causal_gqa int8_fp16_long_gqa int8_fp8_d64_kbias_causal \
           int8_fp8_tma_gqa_tail int8_fp8_f16acc_tma_d64_causal; do
    SAN_ENV=QATTN_TEST_FILTER=$c san "$tool" dense 45 "$T/test_conformance" cuda
  done
  # mma.sync: exact, INT8_FP16, FP8 and F16ACC with P.V on the fp16 mma.
  for c in exact_causal_nq_lt_nk int8_fp16_d128_kbias_causal int8_fp8_d64_kbias_causal int8_fp8_f16acc_d128; do
    SAN_ENV="QATTN_CUDA_WGMMA=0 QATTN_TEST_FILTER=$c" san "$tool" dense-mma 45 "$T/test_conformance" cuda
  done
  for c in bitexact_fp8_block_gqa int8_fp16_warp_f32; do
    SAN_ENV=QATTN_TEST_FILTER=$c san "$tool" quant 40 "$T/test_workspace" cuda
  done
  for c in decode_split4_fp8_csr prefill_int8_row_split2 decode_int8_row_p16 merge_states bad_inputs; do
    SAN_ENV=QATTN_TEST_FILTER=$c san "$tool" paged 40 "$T/test_paged" cuda
  done
  for c in append_fp8_f32 append_int8_row_f32 garbage_dense_split odd_page_mqa_prefill; do
    SAN_ENV=QATTN_TEST_FILTER=$c san "$tool" paged-vs-cpu 40 "$T/test_paged_vs_cpu" cuda 0 0 0
  done
  # '?' stands for the spaces in the case names (SAN_ENV is split on whitespace).
  for c in meta_case 'decode?i8?row*' 'chunked?prefill*' 'adaptive*' page_mass_case; do
    SAN_ENV="QATTN_CUDA_PRUNE=1 QATTN_TEST_FILTER=$c" san "$tool" prune 40 "$T/test_prune" cuda
  done
}
# The Vulkan suites under VK_LAYER_KHRONOS_validation (bookworm's 1.3.239, carried by the kit;
# it predates VK_KHR_cooperative_matrix, so the portable kernels run).
san_vulkan() {
  san vkval conformance 240 "$T/test_conformance" vulkan
  san vkval workspace 60 "$T/test_workspace" vulkan
  san vkval paged 60 "$T/test_paged" vulkan
  san vkval paged-vs-cpu 120 "$T/test_paged_vs_cpu" vulkan
  san vkval prune 120 "$T/test_prune" vulkan
}
rm -f "$O"/sanitize_*
if [[ -x $CS ]]; then
  san_all memcheck & san_all synccheck & san_some racecheck & san_some initcheck &
fi
if [[ -f $K/vklayer/VkLayer_khronos_validation.json ]]; then
  vklayer=$(cd "$K/vklayer" && pwd)
  san_vulkan &
else
  echo "no vklayer/ in the kit (bench/gpu-kit.sh copies it where vulkan-validationlayers is installed)"
fi
wait
# One line per (tool, family): errors summed over its runs ("?" when a run ended without a
# summary: timeout, crash), the runs' rc:seconds (9: errors found, 124: timed out), extras.
printf "%-10s %-13s %7s  %-44s %s\n" tool family errors "runs (rc:seconds)" notes
for log in "$O"/sanitize_*.log; do
  [[ -f $log ]] || continue
  name=${log##*/sanitize_}
  name=${name%.log}
  tool=${name%%_*} fam=${name#*_}
  runs=$(grep -c "^### " "$log")
  if [[ $tool == vkval ]]; then
    errors=$(grep -oE "validation \(QATTN_VULKAN_VALIDATION=1\): [0-9]+ errors" "$log" | grep -oE "[0-9]+ errors" |
      awk '{s += $1} END {print s + 0}')
    sums=$(grep -c "validation (QATTN_VULKAN_VALIDATION=1): " "$log")
    notes="warnings $(grep -oE "[0-9]+ warnings in this process" "$log" | awk '{s += $1} END {print s + 0}')"
  else
    errors=$(grep -oE "ERROR SUMMARY: [0-9]+ error" "$log" | awk '{s += $3} END {print s + 0}')
    sums=$(grep -c "ERROR SUMMARY: " "$log")
    notes=""
    [[ $tool == memcheck ]] && notes="leaks $(grep -c "Leaked [0-9]* bytes" "$log")"
    [[ $tool == racecheck ]] && notes="$(grep -oE "RACECHECK SUMMARY: .*" "$log" | sort | uniq -c | head -3 | paste -sd';')"
  fi
  # cmocka runs in which no group ran a case: a filter that matched nothing.
  empty=$(awk 'function done() { if (seen && !ran) n++; seen = ran = 0 }
    /^### / { done() } /^\[==========\] [0-9]+ test\(s\) run/ { seen = 1; if ($2 > 0) ran = 1 }
    END { done(); print n + 0 }' "$log")
  ((empty)) && notes="$notes; $empty run(s) matched no case"
  skipped=$(grep -c "^skipped" "$log.rc")
  ((sums + skipped < runs)) && errors="$errors?"
  printf "%-10s %-13s %7s  %-44s %s\n" "$tool" "$fam" "$errors" "$(paste -sd' ' "$log.rc" | cut -c1-44)" "$notes"
done
fi

date -u
