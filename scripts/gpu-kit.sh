#!/usr/bin/env bash
# Copies what a run on a remote GPU machine needs out of a build folder into a
# small kit (the library and the test and bench programs, no object files),
# keeping the build's layout so their RUNPATH ($ORIGIN/..) finds libqattn.
# Build for the target GPU only to keep it small, e.g.:
#   meson setup build-gpu -Dnvcc_archs=90a && ninja -C build-gpu && scripts/gpu-kit.sh build-gpu gpu-kit
set -euo pipefail
build=${1:?usage: scripts/gpu-kit.sh BUILD_DIR [KIT_DIR]}
kit=${2:-gpu-kit}
rm -rf "$kit"
mkdir -p "$kit/tests" "$kit/bench" "$kit/tools"
cp -a "$build"/libqattn.so* "$kit/"
for program in tests/test_conformance tests/test_workspace tests/test_paged tests/test_api \
               bench/qattn-bench bench/qattn-decode-bench tools/qattn-info; do
  if [[ -f $build/$program ]]; then cp -a "$build/$program" "$kit/$program"; fi
done
# Backend-specific checks (the OpenCL ones link the core statically; the Vulkan
# one finds libqattn through LD_LIBRARY_PATH, which bench/gpu-run.sh sets).
for check in backends/opencl/check/opencl_paged_check backends/opencl/check/opencl_ws_check \
             backends/vulkan/check/vulkan_paged_vs_cpu; do
  if [[ -f $build/$check ]]; then cp -a "$build/$check" "$kit/tests/"; fi
done
du -sh "$kit"
