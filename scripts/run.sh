#!/usr/bin/env bash
# The README's two quick-start commands, and CI, go through here.
#
#   scripts/run.sh bench [qattn-bench options]  install, build, run the benchmark on the default backend
#   scripts/run.sh test                         install, build, run the whole suite, then again under
#                                               AddressSanitizer + UndefinedBehaviorSanitizer
#   scripts/run.sh deps                         only install what the build and tests need
#
# Debian bookworm (or newer), as root or with sudo. QATTN_NO_APT=1 skips the
# package installation on machines that already have everything.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

packages=(
  gcc g++ libc6-dev meson ninja-build pkg-config libcmocka-dev python3 python3-numpy
  libvulkan-dev libvulkan-volk-dev mesa-vulkan-drivers vulkan-tools vulkan-validationlayers glslang-tools glslc spirv-tools
  ocl-icd-opencl-dev opencl-c-headers pocl-opencl-icd clinfo
  clang libclang-rt-dev
)

deps() {
  [[ ${QATTN_NO_APT:-0} == 1 ]] && return
  local sudo=
  [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  # Bookworm's glslang predates GL_KHR_cooperative_matrix: build trixie's (about 5 minutes, once).
  $sudo bash scripts/install-glslang.sh --with-spirv-tools
}

# nvcc is usually outside PATH; the CUDA backend is built when it is found.
cuda_on_path() {
  if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export PATH="/usr/local/cuda/bin:$PATH"
  fi
}

# The libFuzzer targets (tests/fuzz) under ASan + UBSan, CPU backend only:
# each runs a fixed number of executions from its seed corpus (new inputs go
# to build-fuzz/corpus, not the repository); any crash, sanitizer report or
# wrong result fails. README.md, "Fuzzing", runs them longer.
fuzz_targets() {
  CC=clang configure build-fuzz -Dfuzz=true -Dwerror=true -Db_sanitize=address,undefined -Db_lundef=false \
    -Dbuildtype=debugoptimized -Dcuda=disabled -Dvulkan=disabled -Dopencl=disabled -Demulated_cuda=false \
    -Dopenmp=disabled -Dtests=false -Dbench=false
  ninja -C build-fuzz
  local target runs passed=0
  for target in dense:50000 paged:20000 append:80000 merge:80000 pool:200000 prune:5000; do
    runs=${target#*:}
    target=${target%%:*}
    mkdir -p "build-fuzz/corpus/$target"
    ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
      "build-fuzz/tests/fuzz/fuzz_$target" -runs="$runs" -seed=1 -max_len=256 -timeout=30 -malloc_limit_mb=1024 \
      -print_final_stats=1 "build-fuzz/corpus/$target" "tests/fuzz/corpus/$target"
    passed=$((passed + 1))
  done
  echo "fuzz: $passed passed, 0 failed"
}

configure() {
  local dir=$1
  shift
  if [[ -f $dir/build.ninja ]]; then
    meson setup --reconfigure "$dir" "$@"
  else
    meson setup "$dir" "$@"
  fi
}

mode=${1:-}
[[ $# -gt 0 ]] && shift
case $mode in
  deps)
    deps
    ;;
  bench)
    deps
    cuda_on_path
    configure build -Dwerror=true
    ninja -C build
    ./build/bench/qattn-bench "$@"
    ;;
  test)
    deps
    cuda_on_path
    configure build -Dwerror=true
    ninja -C build
    meson test -C build --print-errorlogs
    # The sanitizer pass covers the host code of every backend that runs here;
    # CUDA is left out (no GPU in CI, and nvcc's host objects are not instrumented).
    # float-cast-overflow is not part of GCC's "undefined": it catches a NaN or
    # out-of-range float converted to an integer (the quantizers' old defect).
    fco=-fsanitize=float-cast-overflow
    configure build-asan -Dwerror=true -Db_sanitize=address,undefined -Db_lundef=false \
      -Dc_args=$fco -Dcpp_args=$fco -Dc_link_args=$fco -Dcpp_link_args=$fco \
      -Dbuildtype=debugoptimized -Dcuda=disabled
    ninja -C build-asan
    ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
      meson test -C build-asan --print-errorlogs --timeout-multiplier 4
    fuzz_start=$SECONDS
    fuzz_targets
    echo "fuzz step: $((SECONDS - fuzz_start)) s"
    ;;
  *)
    sed -n '2,12s/^# \{0,1\}//p' "$0"
    exit 2
    ;;
esac
