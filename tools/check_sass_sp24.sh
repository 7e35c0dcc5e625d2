#!/usr/bin/env bash
# Checks that the shipped 2:4 kernels contain the sparse tensor-core instructions: every
# line of tools/sass_expect_sp24.txt must match in `cuobjdump -sass` of the named kernel.
# Usage: tools/check_sass_sp24.sh [fatbin] (default target/sp24/sparse24.fatbin, built by
# tools/build_sp24_fatbin.sh). cuobjdump: $CUOBJDUMP, next to nvcc installs, then PATH.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
fatbin="${1:-$root/target/sp24/sparse24.fatbin}"
cuobjdump="${CUOBJDUMP:-}"
for cand in "$root/.cache/cuda/nvidia/cu13/bin/cuobjdump" "$root/../.cuda/nvidia/cu13/bin/cuobjdump" "$(command -v cuobjdump || true)"; do
    [[ -z "$cuobjdump" && -n "$cand" && -x "$cand" ]] && cuobjdump="$cand"
done
[[ -n "$cuobjdump" ]] || { echo "error: no cuobjdump (set CUOBJDUMP)" >&2; exit 1; }
[[ -f "$fatbin" ]] || { echo "error: $fatbin missing (run tools/build_sp24_fatbin.sh)" >&2; exit 1; }
here="$(cd "$(dirname "$0")" && pwd)"
expect="$here/sass_expect_sp24.txt" # beside this script (tools/, or the device bundle)
fail=0
while read -r kernel archs regex min; do
    [[ -z "$kernel" || "$kernel" == \#* ]] && continue
    for arch in ${archs//,/ }; do
        count=$("$cuobjdump" -sass -arch "$arch" -fun "$kernel" "$fatbin" | grep -cE "$regex" || true)
        if (( count >= min )); then
            printf 'ok    %-20s %-7s %-28s %4d\n' "$kernel" "$arch" "$regex" "$count"
        else
            printf 'FAIL  %-20s %-7s %-28s %4d (want >= %d)\n' "$kernel" "$arch" "$regex" "$count" "$min"
            fail=1
        fi
    done
done < "$expect"
exit $fail
