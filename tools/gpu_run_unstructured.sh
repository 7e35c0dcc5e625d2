#!/usr/bin/env bash
# Everything of issue 5 (unstructured GEMM + fused attention) that needs a GPU, in one device call.
#
# On the build machine (no GPU needed; nvcc required), stage into the git-ignored .device/
# (AFTER tools/gpu_run.sh, which starts by deleting .device/):
#   tools/gpu_run_unstructured.sh stage
#     - SASS check of this issue's kernels (tools/build_unstructured_kernels.sh; the kernels the
#       executables use are the fatbin build.rs embeds)
#     - the test and bench executables of this issue -> .device/tests, .device/benches (names as
#       tools/gpu_run.sh stages them; skipped when that script already staged them)
#     - the compute-sanitizer wheel (CUDA 13.0, pip) -> .device/unstructured/ (the device machine
#       has no network)
# On the device machine (the device tool; .device must be carried):
#   run(carry=[".device"], command="tools/gpu_run_unstructured.sh")
#     1. environment (GPU, driver, CUDA, git commit)                -> env.txt
#     2. tests/unstructured_gemm.rs, tests/attention_gpu.rs vs the CPU references (SDSPARSE_REQUIRE_GPU=1)
#     3. compute-sanitizer memcheck + racecheck on the small-size tests (every kernel variant)
#     4. criterion benches (cuBLAS dense f16 in the same process) + PyTorch peers, if torch is there
#   Logs: $OUT/unstructured (the device tool brings $OUT back) or .device/out/unstructured.
#   SKIP_BENCH=1 runs only steps 1-3. Exit 0 only when every step passed; summary.txt lists them.
#   Then, here: python3 tools/bench_report_unstructured.py <log dir> -> tables for docs/BENCHMARKS.md
# Without .device/, `run` falls back to cargo (when the machine has a Rust toolchain).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
STAGE=.device/unstructured

stage() {
    set -e
    mkdir -p "$STAGE" .device/tests .device/benches
    NVCC="${NVCC:-$(tools/install_cuda.sh)}"
    export NVCC SDSPARSE_REQUIRE_CUDA=1
    tools/build_unstructured_kernels.sh
    # Executables (release, like tools/gpu_run.sh) unless the cuda helper's stager did it already.
    local need=()
    for t in unstructured_gemm attention_gpu; do [[ -x .device/tests/test-$t ]] || need+=(--test "$t"); done
    if ((${#need[@]})); then
        cargo test --release --no-run --message-format=json-render-diagnostics "${need[@]}" | stage_exes tests
    fi
    need=()
    for b in gemm_unstructured attention; do [[ -x .device/benches/bench-$b ]] || need+=(--bench "$b"); done
    if ((${#need[@]})); then
        cargo bench --no-run --message-format=json-render-diagnostics "${need[@]}" | stage_exes benches
    fi
    if ! ls "$STAGE"/nvidia_cuda_sanitizer_api-13.0.*.whl >/dev/null 2>&1; then
        pip download --no-deps -d "$STAGE" "nvidia-cuda-sanitizer-api==13.0.*" ||
            echo "stage: could not fetch the compute-sanitizer wheel; the device run needs one on PATH" >&2
    fi
    du -sh .device
    echo "stage: done; on the device machine: run(carry=[\".device\"], command=\"tools/gpu_run_unstructured.sh\")"
}

# Copies the executables cargo reports (JSON on stdin) to .device/<tests|benches>/<kind>-<name>.
stage_exes() {
    python3 -c '
import json, os, shutil, subprocess, sys
folder = sys.argv[1]
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    exe = msg.get("executable")
    if msg.get("reason") != "compiler-artifact" or not exe:
        continue
    kind = msg["target"]["kind"][0]
    if kind not in ("test", "bench"):
        continue
    dest = os.path.join(".device", folder, kind + "-" + msg["target"]["name"])
    shutil.copy2(exe, dest)
    subprocess.run(["strip", "--strip-debug", dest], check=False)
    print("stage: %s (%.1f MB)" % (dest, os.path.getsize(dest) / 1e6), file=sys.stderr)
' "$1"
}

run() {
    local log="${OUT:+$OUT/unstructured}"
    log="${log:-.device/out/unstructured}"
    mkdir -p "$log"
    export CARGO_MANIFEST_DIR="$ROOT" SDSPARSE_REQUIRE_GPU=1 RUST_BACKTRACE=1
    export CRITERION_HOME="$log/criterion"
    local summary=() status=0

    {
        date -u
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "no nvidia-smi"
        nvidia-smi 2>&1 | head -12
        git log -1 --oneline 2>/dev/null || true
        python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1
        ls -la .device/tests .device/benches 2>/dev/null
    } >"$log/env.txt" 2>&1
    cat "$log/env.txt"

    # exe_for <tests|benches> <target>: the staged executable, else a cargo command line.
    exe_for() {
        local kind=bench
        [[ $1 == tests ]] && kind=test
        if [[ -x ".device/$1/$kind-$2" ]]; then
            echo ".device/$1/$kind-$2"
        elif command -v cargo >/dev/null; then
            if [[ $1 == tests ]]; then echo "cargo test --release --test $2 --"; else echo "cargo bench --bench $2 --"; fi
        fi
    }
    step() {  # step <name> <command...>
        local name=$1
        shift
        echo "=== $name: $*"
        if "$@" >"$log/$name.log" 2>&1; then summary+=("ok    $name"); else
            summary+=("FAIL  $name (see $log/$name.log)")
            status=1
        fi
        tail -n 30 "$log/$name.log"
    }

    # 2. Tests.
    for t in unstructured_gemm attention_gpu; do
        local cmd
        cmd=$(exe_for tests "$t")
        if [[ -z "$cmd" ]]; then summary+=("FAIL  test $t: not staged and no cargo"); status=1; continue; fi
        # shellcheck disable=SC2086
        step "test_$t" $cmd --nocapture --test-threads=1
        grep -qE "(Bm32|Flash).*rel err" "$log/test_$t.log" || { summary+=("FAIL  test $t never reached the GPU"); status=1; }
    done

    # 3. compute-sanitizer on the small-size tests.
    local san=""
    for c in compute-sanitizer "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
        /usr/local/cuda/compute-sanitizer/compute-sanitizer .cache/cuda/nvidia/cu13/bin/compute-sanitizer; do
        if command -v "$c" >/dev/null 2>&1; then san=$(command -v "$c"); break; fi
    done
    if [[ -z "$san" ]] && ls "$STAGE"/nvidia_cuda_sanitizer_api-13.0.*.whl >/dev/null 2>&1; then
        local dir=/tmp/sdsparse-sanitizer
        python3 -m zipfile -e "$(ls "$STAGE"/nvidia_cuda_sanitizer_api-13.0.*.whl | head -1)" "$dir" &&
            chmod +x "$dir/nvidia/cu13/bin/compute-sanitizer" && san="$dir/nvidia/cu13/bin/compute-sanitizer"
        export LD_LIBRARY_PATH="$dir/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
    fi
    if [[ -z "$san" ]]; then
        summary+=("FAIL  compute-sanitizer not found (stage it with: tools/gpu_run_unstructured.sh stage)")
        status=1
    else
        "$san" --version | tail -1
        for t in unstructured_gemm attention_gpu; do
            local exe=".device/tests/test-$t"
            if [[ ! -x "$exe" ]]; then
                exe=$(cargo test --release --test "$t" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1)
            fi
            for tool in memcheck racecheck; do
                step "sanitizer_${tool}_$t" "$san" --tool "$tool" --error-exitcode 1 "$exe" small_for_sanitizer \
                    --nocapture --test-threads=1
                grep -qE "(Bm32|Flash).*rel err" "$log/sanitizer_${tool}_$t.log" ||
                    { summary+=("FAIL  sanitizer $tool $t ran no kernel"); status=1; }
            done
        done
    fi

    # 4. Benches and peers.
    if [[ -z "${SKIP_BENCH:-}" ]]; then
        for b in gemm_unstructured attention; do
            local cmd
            cmd=$(exe_for benches "$b")
            # shellcheck disable=SC2086
            [[ -n "$cmd" ]] && step "bench_$b" $cmd --bench || { summary+=("FAIL  bench $b not staged"); status=1; }
        done
        if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
            step peers python3 tools/bench_peers_unstructured.py --out "$log/peers.jsonl"
        else
            summary+=("FAIL  PyTorch with CUDA not available here: peers not run")
            status=1
        fi
    fi

    {
        echo "unstructured GPU run summary ($(date -u))"
        printf '%s\n' "${summary[@]}"
    } | tee "$log/summary.txt"
    return $status
}

case "${1:-run}" in
    stage) stage ;;
    run) run ;;
    *)
        sed -n '2,20p' "$0" >&2
        exit 2
        ;;
esac
