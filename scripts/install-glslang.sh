#!/usr/bin/env bash
# Build a glslang that knows GL_KHR_cooperative_matrix (and, with
# --with-spirv-tools, a spirv-val that knows SPV_KHR_cooperative_matrix)
# from Debian trixie *sources* on bookworm, and install it under PREFIX/bin.
# Why: bookworm's glslang 12 and spirv-tools 2023.1 predate KHR coopmat.
#
# Usage: scripts/install-glslang.sh [--with-spirv-tools] [--force] [PREFIX]
#   PREFIX defaults to /opt/qattn-tools. Needs root (apt). On an idle 2-core
#   machine glslang builds in ~3 min and spirv-tools in ~2.5 min more (~13 min
#   in all while other builds compete). Re-running is a no-op once recent
#   enough tools are installed (--force rebuilds).
set -euo pipefail

prefix=/opt/qattn-tools with_spirv_tools=0 force=0
for arg in "$@"; do
  case $arg in
    --with-spirv-tools) with_spirv_tools=1 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,/^set -e/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) echo "unknown option: $arg" >&2; exit 2 ;;
    *) prefix=$arg ;;
  esac
done

# One install at a time: concurrent runs (several builders share /opt/qattn-tools)
# would otherwise replace each other's binaries half-way.
mkdir -p "$prefix"
exec 9>"$prefix/.install.lock"
flock 9

# "Right version" = new enough for KHR coopmat: glslang >= 15, SPIRV-Tools >= 2025.
glslang_ok() {
  local v
  v=$("$prefix/bin/glslang" --version 2>/dev/null | sed -n 's/^Glslang Version: [0-9]*:\([0-9]*\)\..*/\1/p') || true
  [[ ${v:-0} -ge 15 ]]
}
spirv_val_ok() {
  local v
  v=$("$prefix/bin/spirv-val" --version 2>/dev/null | sed -n 's/^SPIRV-Tools v\([0-9]*\).*/\1/p') || true
  [[ ${v:-0} -ge 2025 ]]
}

need_glslang=1 need_spirv_tools=0
if [[ $force == 0 ]] && glslang_ok; then need_glslang=0; fi
if [[ $with_spirv_tools == 1 ]] && { [[ $force == 1 ]] || ! spirv_val_ok; }; then need_spirv_tools=1; fi
if [[ $need_glslang == 0 && $need_spirv_tools == 0 ]]; then
  echo "install-glslang: tools already installed in $prefix/bin"
  exit 0
fi

# Source packages only: a deb-src line for trixie never pulls trixie binaries.
if ! grep -lrs trixie /etc/apt/sources.list /etc/apt/sources.list.d/ | xargs -r grep -qs deb-src; then
  cat > /etc/apt/sources.list.d/qattn-trixie-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
apt-get update -qq
# Build tools from bookworm (no build-dep from trixie).
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  cmake ninja-build g++ python3 ca-certificates >/dev/null

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chown _apt "$work" 2>/dev/null || true   # apt downloads as _apt (else a sandbox warning)
cd "$work"

# Fetch and unpack the upstream (.orig) tarball of a trixie source package into
# ./$1. We take only the .orig tarball, checked against the Sources index hash:
# Debian's glslang patches force pkg-config SPIRV-Tools (breaking ENABLE_OPT=OFF),
# and some mirrors lack the .dsc of spirv-tools/spirv-headers, which makes a plain
# `apt-get source` fail.
fetch_orig() {
  local uri file _size hash
  read -r uri file _size hash < <(apt-get source -qq --print-uris "$1/trixie" | grep '\.orig\.tar\.') \
    || { echo "install-glslang: no trixie source for $1" >&2; return 1; }
  /usr/lib/apt/apt-helper -qq download-file "${uri//\'/}" "$file" "$hash" >/dev/null
  mkdir "$1"
  tar -xf "$file" -C "$1" --strip-components=1
  echo "install-glslang: fetched $file"
}

if [[ $need_glslang == 1 ]]; then
  start=$SECONDS
  fetch_orig glslang
  # ENABLE_OPT=OFF: no SPIRV-Tools dependency (no spirv-opt passes, not needed).
  cmake -S glslang -B glslang/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DENABLE_OPT=OFF -DGLSLANG_TESTS=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_CXX_FLAGS=-w >/dev/null
  ninja --quiet -C glslang/build glslang-standalone
  install -Dm755 glslang/build/StandAlone/glslang "$prefix/bin/glslang"
  ln -sfn glslang "$prefix/bin/glslangValidator"   # 15.x renamed it; keep the old name
  echo "install-glslang: glslang built in $((SECONDS - start)) s"
fi

if [[ $need_spirv_tools == 1 ]]; then
  start=$SECONDS
  fetch_orig spirv-headers
  fetch_orig spirv-tools
  # Only the CLI tools we use; tests and spirv-opt would add many minutes.
  cmake -S spirv-tools -B spirv-tools/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DSPIRV-Headers_SOURCE_DIR="$work/spirv-headers" -DSPIRV_SKIP_TESTS=ON \
    -DSPIRV_WERROR=OFF -DCMAKE_CXX_FLAGS=-w >/dev/null
  ninja --quiet -C spirv-tools/build spirv-val spirv-dis spirv-as
  install -Dm755 -t "$prefix/bin" spirv-tools/build/tools/spirv-{val,dis,as}
  echo "install-glslang: spirv-tools built in $((SECONDS - start)) s"
fi

"$prefix/bin/glslang" --version | head -n 1
if [[ -x $prefix/bin/spirv-val ]]; then "$prefix/bin/spirv-val" --version | head -n 1; fi
