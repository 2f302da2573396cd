#!/usr/bin/env bash
# Checks the Vulkan cooperative-matrix kernel's logic (tiling, masking, online
# softmax, accumulator row map, prefetch, output) on a machine without matrix
# units: a build with -DQATTN_VK_FORCE_EMULATED_COOPMAT runs attn_coopmat.comp
# with every matrix operation emulated, on lavapipe, against the fp64 reference
# of qattn-bench.
#
# Lavapipe comes from Mesa 25 (Debian bookworm-backports), unpacked into a
# private prefix; the system's Mesa is not touched. Why not bookworm's Mesa
# 22.3: its lavapipe returns wrong scores for this shader after about a hundred
# emulated matrix products (from the 7th 32-key tile at D=64, the 4th at
# D=128), deterministically; Mesa 25.0.7 runs the same SPIR-V exactly.
#
# Usage: scripts/vk-emulated-coopmat-test.sh [BUILD_DIR]   (default build-vk-emu)
#   QATTN_LVP_PREFIX (default /opt/qattn-lvp25) holds the unpacked driver.
# Needs root for apt-get (downloads only). Prints 'N passed, N failed'.
set -euo pipefail
prefix=${QATTN_LVP_PREFIX:-/opt/qattn-lvp25}
build=${1:-build-vk-emu}
root=$(git rev-parse --show-toplevel)
cd "$root"

if [ ! -f "$prefix/lvp_icd.json" ]; then
  # A private sources list and index (apt would delete a sources list kept in its lists folder).
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  chmod 755 "$work"
  mkdir -p "$work/lists/partial" "$prefix/debs"
  echo "deb http://deb.debian.org/debian bookworm-backports main" > "$work/sources.list"
  apt_opts=(-o "Dir::Etc::sourcelist=$work/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$work/lists")
  apt-get "${apt_opts[@]}" update -qq
  chmod 777 "$prefix/debs"
  (cd "$prefix/debs" && apt-get "${apt_opts[@]}" download -qq mesa-vulkan-drivers/bookworm-backports \
     libdrm2/bookworm-backports libdrm-amdgpu1/bookworm-backports 2>&1 | grep -v unsandboxed || true)
  for deb in "$prefix"/debs/*.deb; do dpkg -x "$deb" "$prefix/root"; done
  lib=$prefix/root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so
  [ -f "$lib" ] || { echo "vk-emulated-coopmat-test: lavapipe did not unpack" >&2; exit 2; }
  printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "%s", "api_version": "1.3.0"}}\n' "$lib" \
    > "$prefix/lvp_icd.json"
fi

if [ ! -d "$build" ]; then
  meson setup "$build" -Dwerror=true -Dcuda=disabled -Dopencl=disabled -Dtests=false \
    -Dc_args=-DQATTN_VK_FORCE_EMULATED_COOPMAT >/dev/null
fi
ninja -C "$build" -j2 >/dev/null

export VK_ICD_FILENAMES=$prefix/lvp_icd.json
export LD_LIBRARY_PATH=$prefix/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
pass=0 fail=0
while read -r shape; do
  out=$("$build/bench/qattn-bench" --backend vulkan --precision exact --b 1 --warmup 0 --iters 1 \
        --check-rows 24 --json $shape 2>&1 | grep '^{' || true)
  if [[ $out == *'"verdict":"ok"'* && $out == *coopmat_emulated* ]]; then
    pass=$((pass + 1)); echo "ok    $shape"
  else
    fail=$((fail + 1)); echo "FAIL  $shape: $out"
  fi
done <<'EOF'
--n 300 --h 2 --d 64
--n 260 --h 2 --d 128
--nq 50 --nk 431 --h 4 --hkv 2 --d 128 --causal
--nq 331 --nk 150 --h 2 --d 64 --causal
--n 200 --h 2 --d 128 --layout nhd
--n 77 --h 3 --hkv 1 --d 64
--nq 1 --nk 190 --h 2 --d 128
EOF
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
