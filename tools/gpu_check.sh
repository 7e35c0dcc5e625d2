#!/usr/bin/env bash
# Builds (release, stripped) and stages the one prepared GPU check into the git-ignored .device/,
# under the device tool's 64 MiB carry limit, and rehearses it here. Replaces the former
# tools/gpu_run.sh, tools/sp24_gpu_run.sh and tools/gpu_run_unstructured.sh (docs/CUDA.md).
#
#   tools/gpu_check.sh              build + stage + dry run of .device/check.sh here
#   tools/gpu_check.sh --no-build   re-stage from the last release build (scripts, peers, wheels)
#
# Then, in a session that has the GPU machine (no cargo, no network there), ONE call:
#
#   run(carry=[".device"], command="bash .device/check.sh \"$OUT\"", timeout_s=570)
#
# and read $OUT/summary.md (tools/device_check.sh says what each step does).
#
# Staged: .device/bundle.tar.xz (the lib unit-test, 2:4 / unstructured / attention / pipeline test
# and bench executables, release, debug info stripped, xz-compressed: each embeds the 8 MB fatbin),
# and the release `sdsparse` CLI (full-size stage), .device/check.sh (= tools/device_check.sh),
# .device/peers/ (the PyTorch peer scripts, the diffusers fp16 pipeline peer among them),
# .device/manifest.txt (commit, sizes), and, when pip can fetch them here, the compute-sanitizer
# wheel (CUDA 13.0) and a diffusers wheel for the pipeline peer. Test data (tests/fixtures) is
# tracked, so it travels with the working tree, not in .device/.
# The release build is CPU-heavy: it runs under nice -n 19.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LIMIT_MIB=64

build=1
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        *) sed -n '2,22p' "$0" >&2; exit 2 ;;
    esac
done

if [[ -z "${NVCC:-}" ]]; then
    if [[ -x .cache/cuda/nvidia/cu13/bin/nvcc ]]; then NVCC="$ROOT/.cache/cuda/nvidia/cu13/bin/nvcc"; else NVCC="$(tools/install_cuda.sh)"; fi
fi
# A GPU check without kernels would only skip: refuse to build one.
export NVCC SDSPARSE_REQUIRE_CUDA=1

stage_dir=.device
bins="$stage_dir/bin"
if ((build)); then
    rm -rf "$stage_dir"
    mkdir -p "$bins"
    # Copies each executable cargo reports (JSON on stdin) to $bins/<test|bench>-<target name>.
    collect() {
        python3 -c '
import json, os, shutil, subprocess, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    exe = msg.get("executable")
    if msg.get("reason") != "compiler-artifact" or not exe:
        continue
    # The library target is ["rlib", "cdylib"] since the C ABI: its unit-test executable is "test-sdsparse".
    kinds = msg["target"]["kind"]
    kind = "test" if set(kinds) & {"lib", "rlib", "cdylib"} else kinds[0]
    if kind not in ("test", "bench"):
        continue
    name = kind + "-" + msg["target"]["name"]
    dest = os.path.join(sys.argv[1], name)
    shutil.copy2(exe, dest)
    subprocess.run(["strip", "--strip-debug", dest], check=True)
    print("gpu_check: staged %s (%.1f MB)" % (dest, os.path.getsize(dest) / 1e6), file=sys.stderr)
' "$bins"
    }
    nice -n 19 cargo test --release --no-run --message-format=json-render-diagnostics \
        --lib --test sparse24_gemm --test unstructured_gemm --test attention_gpu --test sparse_linear --test pipeline | collect
    nice -n 19 cargo bench --no-run --message-format=json-render-diagnostics \
        --bench gemm_sparse24 --bench gemm_unstructured --bench attention | collect
    # The CLI for the full-size stage (synth, convert, generate --device cuda).
    nice -n 19 cargo build --release --bin sdsparse
    cp target/release/sdsparse "$bins/sdsparse"
    strip --strip-debug "$bins/sdsparse"
    echo "gpu_check: staged $bins/sdsparse ($(du -m "$bins/sdsparse" | cut -f1) MB)" >&2
    for e in test-sdsparse test-sparse24_gemm test-unstructured_gemm test-attention_gpu test-sparse_linear test-pipeline \
        bench-gemm_sparse24 bench-gemm_unstructured bench-attention sdsparse; do
        [[ -x "$bins/$e" ]] || { echo "gpu_check: $e was not built" >&2; exit 1; }
    done
    # xz, not gzip: the ten executables (each embedding the 8 MB fatbin, the CLI also the toy
    # model) are ~51 MB as .tgz, over the carry limit with the wheels; ~33 MB as .tar.xz.
    XZ_OPT="-6 -T2" nice -n 19 tar -cJf "$stage_dir/bundle.tar.xz" -C "$bins" .
fi
[[ -f "$stage_dir/bundle.tar.xz" ]] || { echo "gpu_check: no $stage_dir/bundle.tar.xz; run without --no-build" >&2; exit 1; }
rm -rf "$bins"

cp tools/device_check.sh "$stage_dir/check.sh"
chmod +x "$stage_dir/check.sh"
mkdir -p "$stage_dir/peers"
cp tools/bench_peers_gemm.py tools/bench_peers_unstructured.py tools/bench_gpu_peer_sd.py "$stage_dir/peers/"

# Wheels the GPU machine cannot download itself (best effort: the check reports what is missing).
if ! ls "$stage_dir"/nvidia_cuda_sanitizer_api-13.0.*.whl >/dev/null 2>&1; then
    pip download -q --no-deps -d "$stage_dir" "nvidia-cuda-sanitizer-api==13.0.*" 2>/dev/null ||
        echo "gpu_check: could not fetch the compute-sanitizer wheel (the check uses one on the GPU machine's PATH)" >&2
fi
if ! ls "$stage_dir"/diffusers-*.whl >/dev/null 2>&1; then
    pip download -q --no-deps -d "$stage_dir" diffusers 2>/dev/null ||
        echo "gpu_check: could not fetch a diffusers wheel (the full-size stage's peer will say 'peer skipped')" >&2
fi

{
    echo "sdsparse $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty tree)'), staged $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "bundle.tar.xz built $(date -u -r "$stage_dir/bundle.tar.xz" +%Y-%m-%dT%H:%MZ)$( ((build)) || echo ' (earlier run: --no-build)')"
    echo "nvcc $("$NVCC" --version | tail -1)"
    (cd "$stage_dir" && find . -type f -printf '%8s B  %p\n' | sort -k3)
} >"$stage_dir/manifest.txt"

bytes=$(du -sb "$stage_dir" | cut -f1)
mib=$(((bytes + 1048575) / 1048576))
echo "gpu_check: .device/ is $mib MiB ($bytes B) of the $LIMIT_MIB MiB carry limit" >&2
if ((bytes >= LIMIT_MIB * 1048576)); then
    echo "gpu_check: FAIL: .device/ is over the carry limit" >&2
    exit 1
fi

# Rehearsal: the script's syntax, and a dry run that skips every GPU step.
bash -n "$stage_dir/check.sh"
if command -v shellcheck >/dev/null 2>&1; then shellcheck tools/gpu_check.sh tools/device_check.sh; fi
dry_out="$(mktemp -d)"
if bash "$stage_dir/check.sh" "$dry_out" --dry-run >/dev/null; then
    echo "gpu_check: dry run passed (summary: $dry_out/summary.md)" >&2
else
    echo "gpu_check: FAIL: the dry run failed (summary: $dry_out/summary.md)" >&2
    exit 1
fi
echo "gpu_check: ready: run(carry=[\".device\"], command=\"bash .device/check.sh \\\"\$OUT\\\"\", timeout_s=570)" >&2
