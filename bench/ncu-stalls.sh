#!/usr/bin/env bash
# Where the attention kernel's cycles go, on the GPU machine: per mode, one
# qattn_run of B=1 H=16 N=16384 D=128 under ncu, printing the warp stall
# reasons per issued instruction, instruction count, issue utilization and the
# per-pipe utilization of the attention kernel (zero rows dropped).
#   bash bench/ncu-stalls.sh [KIT] [MODES...]   (default: gpu-kit int8_fp8 exact)
K=${1:-gpu-kit}
shift || true
for prec in ${*:-int8_fp8 exact}; do
  echo "== $prec"
  ncu -k 'regex:attention' -c 1 --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum,smsp__cycles_active.avg,sm__cycles_elapsed.avg,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active' \
    "$K/bench/qattn-bench" --backend cuda --b 1 --h 16 --n 16384 --d 128 --precision "$prec" --warmup 0 --iters 1 \
    --check-rows 0 --no-finite-check 2>&1 | grep -vE "^\[|qattn-bench|^precision|^ *$" | awk '$NF != 0 && $NF != "0.00"'
done
