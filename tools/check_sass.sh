#!/usr/bin/env bash
# Checks the built kernel fatbin: it holds SASS for sm_75, sm_80, sm_86, sm_89, sm_90a and
# compute_75 + compute_80 PTX, and each kernel's SASS (or the compute_75 PTX) contains the
# instructions tools/sass_expect.txt requires (for example the sparse tensor-core MMAs of the 2:4
# GEMM on sm_80+, and on sm_75 a trap instead of any tensor-core instruction), so a change that
# silently loses them fails CI.
#
#   tools/check_sass.sh [FATBIN]     default: the newest target/**/build/sdsparse-*/out/sdsparse.fatbin
#   SASS_DUMP_DIR=dir tools/check_sass.sh   also keeps the per-arch SASS / PTX listings in dir
#
# cuobjdump is taken from CUOBJDUMP, next to NVCC, PATH, or .cache/cuda (tools/install_cuda.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXPECT="$ROOT/tools/sass_expect.txt"
ARCHS=(sm_75 sm_80 sm_86 sm_89 sm_90a)
TC_ARCHS=(sm_80 sm_86 sm_89 sm_90a) # "tc" in the expectations: the tensor-core (sm_80+) images
PTX_ARCHS=(sm_75 sm_80)             # cuobjdump names the compute_XY PTX after its target

fail() { echo "check_sass: FAIL: $*" >&2; exit 1; }

fatbin="${1:-}"
if [[ -z "$fatbin" ]]; then
    fatbin="$(ls -t "$ROOT"/target/*/build/sdsparse-*/out/sdsparse.fatbin \
        "$ROOT"/target/*/*/build/sdsparse-*/out/sdsparse.fatbin 2>/dev/null | head -n 1 || true)"
fi
[[ -n "$fatbin" && -f "$fatbin" ]] || fail "no fatbin found; build with nvcc first (cargo build)"

cuobjdump="${CUOBJDUMP:-}"
if [[ -z "$cuobjdump" && -n "${NVCC:-}" && -x "$(dirname "$NVCC")/cuobjdump" ]]; then
    cuobjdump="$(dirname "$NVCC")/cuobjdump"
fi
if [[ -z "$cuobjdump" ]] && command -v cuobjdump >/dev/null 2>&1; then cuobjdump="$(command -v cuobjdump)"; fi
if [[ -z "$cuobjdump" && -x "$ROOT/.cache/cuda/nvidia/cu13/bin/cuobjdump" ]]; then
    cuobjdump="$ROOT/.cache/cuda/nvidia/cu13/bin/cuobjdump"
fi
[[ -n "$cuobjdump" ]] || fail "cuobjdump not found (run tools/install_cuda.sh --pinned)"

echo "check_sass: $fatbin ($(wc -c <"$fatbin") bytes) with $cuobjdump"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

elfs="$("$cuobjdump" --list-elf "$fatbin")"
ptxs="$("$cuobjdump" --list-ptx "$fatbin")"
for arch in "${ARCHS[@]}"; do
    grep -q "\.$arch\.cubin" <<<"$elfs" || fail "no $arch SASS in the fatbin"
    "$cuobjdump" -sass -arch "$arch" "$fatbin" >"$work/$arch.sass"
    echo "check_sass: $arch: $(grep -c 'Function :' "$work/$arch.sass") kernels"
done
for arch in "${PTX_ARCHS[@]}"; do
    grep -q "\.$arch\.ptx" <<<"$ptxs" || fail "no compute_${arch#sm_} PTX in the fatbin"
done
# The compute_75 PTX, in the same "Function : name" form as the SASS listings (one header line
# per .entry), so the expectations read both the same way.
"$cuobjdump" -ptx -arch sm_75 "$fatbin" |
    sed -E 's/^[.a-z ]*\.entry[[:space:]]+([A-Za-z0-9_]+).*/\t\tFunction : \1/' >"$work/compute_75.sass"
echo "check_sass: compute_75 PTX: $(grep -c 'Function :' "$work/compute_75.sass") kernels"
if [[ -n "${SASS_DUMP_DIR:-}" ]]; then mkdir -p "$SASS_DUMP_DIR" && cp "$work"/*.sass "$SASS_DUMP_DIR"/; fi
# Every kernel exists in every image (the host looks kernels up by name, whatever the GPU).
names() { grep 'Function :' "$1" | awk '{ print $3 }' | sort; }
for listing in "$work"/*.sass; do
    [[ "$(names "$listing")" == "$(names "$work/sm_80.sass")" ]] ||
        fail "$(basename "$listing" .sass) holds other kernels than sm_80: $(diff <(names "$listing") <(names "$work/sm_80.sass") | tr '\n' ' ')"
done

# Prints one line per kernel whose name contains $2: "<kernel> yes|no" (does it match regex $3).
check_kernels() {
    # Passed through the environment: awk -v would treat backslashes as string escapes.
    SASS_SUB="$2" SASS_RE="$3" awk '
        BEGIN { sub_ = ENVIRON["SASS_SUB"]; re = ENVIRON["SASS_RE"] }
        /Function :/ { fn = $3; if (index(fn, sub_) > 0) { seen[fn] = 0; order[n++] = fn } next }
        fn != "" && (fn in seen) && $0 ~ re { seen[fn] = 1 }
        END { for (i = 0; i < n; i++) print order[i], (seen[order[i]] ? "yes" : "no") }
    ' "$1"
}

failures=0
checked=0
while read -r arch kernel regex rest; do
    [[ -z "${arch:-}" || "$arch" == \#* ]] && continue
    [[ -n "${regex:-}" && -z "${rest:-}" ]] || fail "bad line in $EXPECT: $arch $kernel $regex $rest"
    negate=0
    if [[ "$regex" == !* ]]; then negate=1; regex="${regex:1}"; fi
    case "$arch" in
        "*") arches=("${ARCHS[@]}") ;;
        tc) arches=("${TC_ARCHS[@]}") ;;
        *) arches=("$arch") ;;
    esac
    for a in "${arches[@]}"; do
        [[ -f "$work/$a.sass" ]] || fail "$EXPECT names unknown arch $a"
        result="$(check_kernels "$work/$a.sass" "$kernel" "$regex")"
        if [[ -z "$result" ]]; then
            echo "check_sass: FAIL $a: no kernel matches '$kernel'" >&2
            failures=$((failures + 1))
            continue
        fi
        while read -r fn has; do
            checked=$((checked + 1))
            if [[ $negate == 0 && $has == no ]]; then
                echo "check_sass: FAIL $a $fn: no instruction matches /$regex/" >&2
                failures=$((failures + 1))
            elif [[ $negate == 1 && $has == yes ]]; then
                echo "check_sass: FAIL $a $fn: contains /$regex/, which it must not" >&2
                failures=$((failures + 1))
            fi
        done <<<"$result"
    done
done <"$EXPECT"

[[ $failures == 0 ]] || fail "$failures expectation(s) not met"
echo "check_sass: OK ($checked kernel checks over ${ARCHS[*]} and the compute_75 PTX, compute_80 PTX present)"
