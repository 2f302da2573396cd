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
for lib in "$build"/libqattn.so*; do
  [[ -d $lib ]] || cp -a "$lib" "$kit/" # not the .p folder of object files
done
# test_opencl exists only in builds with the OpenCL backend.
for program in tests/test_conformance tests/test_workspace tests/test_paged tests/test_paged_vs_cpu tests/test_sparse tests/test_prune \
               tests/test_opencl tests/test_api bench/qattn-bench bench/qattn-decode-bench bench/qattn-prune-bench tools/qattn-info; do
  if [[ -f $build/$program ]]; then cp -a "$build/$program" "$kit/$program"; fi
done
# The Khronos validation layer for gpu-run.sh's sanitize section (the GPU machine has none): its
# library beside a manifest that names it relative to itself, found through VK_LAYER_PATH there.
# The library needs only libc and libstdc++ (older than Ubuntu 24.04's).
layer_lib=/usr/lib/x86_64-linux-gnu/libVkLayer_khronos_validation.so
layer_json=/usr/share/vulkan/explicit_layer.d/VkLayer_khronos_validation.json
if [[ -f $layer_lib && -f $layer_json ]]; then
  mkdir -p "$kit/vklayer"
  cp "$layer_lib" "$kit/vklayer/"
  sed -E 's|"library_path": *"[^"]*"|"library_path": "./libVkLayer_khronos_validation.so"|' "$layer_json" \
    > "$kit/vklayer/VkLayer_khronos_validation.json"
else
  echo "no Vulkan validation layer here (apt install vulkan-validationlayers): the kit carries none"
fi
du -sh "$kit"
