#!/usr/bin/env bash
# Copies what a run on a remote GPU machine needs out of a build folder into a
# small kit (the library and the test and bench programs, no object files),
# keeping the build's layout so their RUNPATH ($ORIGIN/..) finds libqattn.
# Build for the target GPU only to keep it small, e.g.:
#   meson setup build-gpu -Dnvcc_archs=90a && ninja -C build-gpu && bench/gpu-kit.sh build-gpu gpu-kit
set -euo pipefail
build=${1:?usage: bench/gpu-kit.sh BUILD_DIR [KIT_DIR]}
kit=${2:-gpu-kit}
rm -rf "$kit"
mkdir -p "$kit/tests" "$kit/bench" "$kit/tools"
cp -a "$build"/libqattn.so* "$kit/"
# test_opencl exists only in builds with the OpenCL backend.
for program in tests/test_conformance tests/test_workspace tests/test_paged tests/test_paged_vs_cpu \
               tests/test_opencl tests/test_api bench/qattn-bench bench/qattn-decode-bench tools/qattn-info; do
  if [[ -f $build/$program ]]; then cp -a "$build/$program" "$kit/$program"; fi
done
du -sh "$kit"
