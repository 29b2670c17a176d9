#!/usr/bin/env bash
# Build an mmcv wheel with compiled ops against the torch of a given Python, and cache it.
# Usage: tools/build_mmcv.sh PYTHON WHEEL_CACHE [MMCV_VERSION]
# mmcv 2.1.0's setup.py asks for -std=c++14/17, which torch >= 2.10 headers reject; the
# sdist is patched to c++20. The wheel lands in WHEEL_CACHE; a cached wheel is reused.
set -euo pipefail
case $1 in */*) python="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" ;; *) python=$(command -v "$1") ;; esac
cache=$2
version=${3:-2.1.0}
mkdir -p "$cache"
if ls "$cache"/mmcv-"$version"-*.whl >/dev/null 2>&1; then
  echo "mmcv $version wheel cached in $cache"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
  -d "$work" "mmcv==$version"
tar -xzf "$work"/mmcv-"$version".tar.gz -C "$work"
src="$work/mmcv-$version"
sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g; s/c\+\+1[47]/c++20/g' "$src/setup.py"
echo "building mmcv $version with ops (about 13 minutes on 2 idle cores)"
# -g0: no debug info (Python's own CFLAGS carry -g), which shortens the compile of the ~80
# torch-header-heavy sources
(cd "$src" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} CFLAGS="${CFLAGS:-} -g0" \
  "$python" -m pip wheel --no-deps --no-build-isolation -w "$work/dist" . )
cp "$work"/dist/mmcv-*.whl "$cache"/
echo "cached $(ls "$cache"/mmcv-"$version"-*.whl)"
