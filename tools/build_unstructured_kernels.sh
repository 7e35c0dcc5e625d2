#!/usr/bin/env bash
# Builds the unstructured GEMM and attention kernels into fatbins (sm_80, sm_86, sm_89, sm_90a
# SASS + compute_80 PTX) under target/cuda/, and checks their SASS against
# tools/sass_expect_unstructured.txt (tensor-core instructions present on every architecture,
# no local-memory spills).
#
#   tools/build_unstructured_kernels.sh            # build + check
#   NVCC=/path/to/nvcc tools/build_unstructured_kernels.sh
#
# nvcc is taken from $NVCC, $CUDA_HOME/bin, PATH, then the repo-local .cache/cuda install and
# the helper machine's /work/wt/.cuda. cuobjdump is looked up next to nvcc. The launchers read
# the fatbins from target/cuda (or $SDSPARSE_CUDA_KERNEL_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

find_nvcc() {
    if [[ -n "${NVCC:-}" ]]; then echo "$NVCC"; return; fi
    if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then echo "$CUDA_HOME/bin/nvcc"; return; fi
    if command -v nvcc >/dev/null; then command -v nvcc; return; fi
    for c in .cache/cuda/nvidia/cu13/bin/nvcc /work/wt/.cuda/nvidia/cu13/bin/nvcc /usr/local/cuda/bin/nvcc; do
        if [[ -x "$c" ]]; then echo "$c"; return; fi
    done
    echo "no nvcc found (set NVCC)" >&2
    exit 1
}
NVCC_BIN=$(find_nvcc)
CUOBJDUMP="$(dirname "$NVCC_BIN")/cuobjdump"
[[ -x "$CUOBJDUMP" ]] || CUOBJDUMP=$(command -v cuobjdump || true)
OUT=${SDSPARSE_CUDA_KERNEL_DIR:-target/cuda}
mkdir -p "$OUT"
ARCHS="-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_86,code=sm_86 \
 -gencode=arch=compute_89,code=sm_89 -gencode=arch=compute_90a,code=sm_90a \
 -gencode=arch=compute_80,code=compute_80"
FLAGS="-fatbin -O3 -std=c++17 -lineinfo --expt-relaxed-constexpr -Icuda/include -Icuda"
echo "nvcc: $NVCC_BIN ($("$NVCC_BIN" --version | grep -o 'V[0-9.]*' | head -1))"
for k in unstructured_gemm attention; do
    # shellcheck disable=SC2086
    "$NVCC_BIN" $FLAGS $ARCHS -Xptxas -v "cuda/$k.cu" -o "$OUT/$k.fatbin" 2>"$OUT/$k.ptxas.log" || {
        cat "$OUT/$k.ptxas.log"; exit 1; }
    echo "built $OUT/$k.fatbin ($(stat -c %s "$OUT/$k.fatbin") bytes)"
done
# The crate's build.rs compiles every cuda/*.cu as ONE translation unit: check that ours
# coexist there too (no clashing names).
UNITY="$OUT/unity_check.cu"
{ for f in cuda/*.cu; do echo "#include \"$(basename "$f")\""; done; } >"$UNITY"
# shellcheck disable=SC2086
"$NVCC_BIN" $FLAGS -gencode=arch=compute_80,code=sm_80 -c "$UNITY" -o "$OUT/unity_check.o"
echo "unity translation unit of all cuda/*.cu: compiles"

if grep -q "bytes spill" "$OUT"/*.ptxas.log && grep "bytes spill" "$OUT"/*.ptxas.log | grep -vq " 0 bytes spill stores, 0 bytes spill loads"; then
    echo "FAIL: register spills:"; grep "spill" "$OUT"/*.ptxas.log | grep -v " 0 bytes spill stores"; exit 1
fi

[[ -x "$CUOBJDUMP" ]] || { echo "no cuobjdump: SASS not checked"; exit 0; }
# Expectation lines: <fatbin> <kernel> <arch> <instruction regex> <min count>
fail=0
while read -r fatbin kernel arch pattern min; do
    [[ -z "$fatbin" || "$fatbin" == \#* ]] && continue
    count=$("$CUOBJDUMP" -sass -arch "$arch" -fun "$kernel" "$OUT/$fatbin.fatbin" 2>/dev/null | grep -cE "$pattern" || true)
    if (( count >= min )); then status=ok; else status=FAIL; fail=1; fi
    printf '%-5s %-18s %-28s %-7s %-22s %4d (min %d)\n' "$status" "$fatbin" "$kernel" "$arch" "$pattern" "$count" "$min"
done < tools/sass_expect_unstructured.txt
exit $fail
