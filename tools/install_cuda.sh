#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler wheels (nvcc, ptxas, headers, cuobjdump) into
# <repo>/.cache/cuda when no nvcc is found, and prints the nvcc path on stdout (all other output
# goes to stderr), so a shell or CI can do:
#
#   export NVCC="$(tools/install_cuda.sh)"            # an existing nvcc, else the pinned wheels
#   export NVCC="$(tools/install_cuda.sh --pinned)"   # always the pinned wheels (what CI uses)
#
# build.rs also looks in .cache/cuda on its own, so setting NVCC is optional.
# Idempotent: a stamp file records the pins of a complete install; nothing is downloaded twice.
# Needs python3 with pip and access to PyPI (the wheels are about 100 MB, 280 MB unpacked).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/cuda"
LOCAL_NVCC="$DEST/nvidia/cu13/bin/nvcc"
STAMP="$DEST/.sdsparse-pins"
# The compiler is CUDA 13.0; cuobjdump/nvdisasm come from 13.2 because 13.0 has no such wheels.
PINS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-cuobjdump==13.2.51
    nvidia-cuda-nvdisasm==13.2.51
)

pinned=0
case "${1:-}" in
    --pinned) pinned=1 ;;
    "") ;;
    -h | --help)
        sed -n '2,11p' "$0" >&2
        exit 0
        ;;
    *)
        echo "usage: $0 [--pinned]" >&2
        exit 2
        ;;
esac

log() { echo "install_cuda: $*" >&2; }

# The same search order as build.rs.
find_nvcc() {
    if [[ -n "${NVCC:-}" && -x "${NVCC}" ]]; then echo "$NVCC"; return 0; fi
    for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
        if [[ -n "$home" && -x "$home/bin/nvcc" ]]; then echo "$home/bin/nvcc"; return 0; fi
    done
    if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return 0; fi
    return 1
}

if [[ $pinned == 0 ]] && found="$(find_nvcc)"; then
    log "using $found"
    echo "$found"
    exit 0
fi

if [[ -x "$LOCAL_NVCC" && -f "$STAMP" && "$(cat "$STAMP")" == "${PINS[*]}" ]]; then
    log "pinned CUDA wheels already in $DEST"
    echo "$LOCAL_NVCC"
    exit 0
fi

log "installing ${PINS[*]} into $DEST"
# Install next to the destination, then swap it in: an interrupted install never looks complete.
TMP="$DEST.tmp.$$"
rm -rf "$TMP"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$(dirname "$DEST")"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-input --no-deps --only-binary=:all: \
    --target "$TMP" "${PINS[@]}" >&2
if [[ ! -x "$TMP/nvidia/cu13/bin/nvcc" ]]; then
    log "pip finished but $TMP/nvidia/cu13/bin/nvcc is missing"
    exit 1
fi
echo "${PINS[*]}" >"$TMP/.sdsparse-pins"
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
"$LOCAL_NVCC" --version | tail -n 2 >&2
# A build that already ran without nvcc only reruns build.rs when something it watches changes.
touch "$ROOT/build.rs"
echo "$LOCAL_NVCC"
