#!/usr/bin/env bash
# Compiles cuda/sparse24_gemm.cu alone into target/sp24/sparse24.fatbin (SASS for sm_80,
# sm_86, sm_89, sm_90a + compute_80 PTX, the crate's gencodes) for the 2:4 tests, benches
# and SASS check, independent of build.rs. nvcc: $NVCC, the repo-local pinned install
# (.cache/cuda/...), the helpers' shared install (../.cuda/...), then PATH.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
nvcc="${NVCC:-}"
for cand in "$root/.cache/cuda/nvidia/cu13/bin/nvcc" "$root/../.cuda/nvidia/cu13/bin/nvcc" "$(command -v nvcc || true)"; do
    [[ -z "$nvcc" && -n "$cand" && -x "$cand" ]] && nvcc="$cand"
done
[[ -n "$nvcc" ]] || { echo "error: no nvcc (set NVCC or run tools/install_cuda.sh)" >&2; exit 1; }
out="${1:-$root/target/sp24/sparse24.fatbin}"
mkdir -p "$(dirname "$out")"
"$nvcc" -fatbin -O3 -std=c++17 -lineinfo --expt-relaxed-constexpr \
    -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_86,code=sm_86 \
    -gencode=arch=compute_89,code=sm_89 -gencode=arch=compute_90a,code=sm_90a \
    -gencode=arch=compute_80,code=compute_80 \
    -I "$root/cuda/include" "$root/cuda/sparse24_gemm.cu" -o "$out"
echo "wrote $out ($("$nvcc" --version | grep -o 'V[0-9][0-9.]*'))"
