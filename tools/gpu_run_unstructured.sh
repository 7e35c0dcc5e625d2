#!/usr/bin/env bash
# One command for everything of issue 5 that needs a GPU (the `cuda` helper's tools/gpu_run.sh
# can call it; it also runs on its own on the device machine):
#   1. environment: GPU, driver, CUDA, nvcc, rustc  -> env.txt
#   2. kernels: tools/build_unstructured_kernels.sh (fatbins + SASS check); prebuilt fatbins in
#      target/cuda are used when no nvcc is there
#   3. tests: tests/unstructured_gemm.rs, tests/attention_gpu.rs (GPU vs CPU reference)
#   4. compute-sanitizer memcheck + racecheck on the small-size tests (every kernel variant)
#   5. criterion benches (cuBLAS dense f16 baseline in the same run) + PyTorch peers
# Logs go to $OUT/unstructured (the device tool's $OUT) or target/gpu-run-unstructured.
# Exit status: 0 only when every step passed; a summary is printed at the end and written to
# summary.txt. Set SKIP_BENCH=1 to run only build, tests and sanitizers.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:+$OUT/unstructured}
LOG=${LOG:-target/gpu-run-unstructured}
mkdir -p "$LOG"
declare -a SUMMARY=()
status=0
step() {  # step <name> <command...>: run, tee the log, record ok/FAIL
    local name=$1; shift
    echo "=== $name: $*"
    if "$@" >"$LOG/$name.log" 2>&1; then SUMMARY+=("ok    $name"); else SUMMARY+=("FAIL  $name (see $LOG/$name.log)"); status=1; fi
    tail -n 40 "$LOG/$name.log"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "no nvidia-smi"
    nvidia-smi 2>&1 | head -15
    for c in "${NVCC:-}" nvcc .cache/cuda/nvidia/cu13/bin/nvcc /usr/local/cuda/bin/nvcc; do
        [[ -n "$c" ]] && command -v "$c" >/dev/null 2>&1 && { "$c" --version | tail -2; break; }
    done
    rustc --version; cargo --version
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
    git log -1 --oneline 2>/dev/null
} >"$LOG/env.txt" 2>&1
cat "$LOG/env.txt"

# 2. Kernels. Without nvcc, fall back to fatbins that were built elsewhere and carried along.
if tools/build_unstructured_kernels.sh >"$LOG/build_kernels.log" 2>&1; then
    SUMMARY+=("ok    build_kernels + SASS check")
elif [[ -f target/cuda/unstructured_gemm.fatbin && -f target/cuda/attention.fatbin ]] && grep -q "no nvcc" "$LOG/build_kernels.log"; then
    SUMMARY+=("warn  build_kernels: no nvcc, using prebuilt target/cuda/*.fatbin")
else
    SUMMARY+=("FAIL  build_kernels (see $LOG/build_kernels.log)"); status=1
fi
tail -n 60 "$LOG/build_kernels.log"

# 3. Tests (GPU part runs because a GPU is present; they fail, not skip, if the kernels are missing).
step tests cargo test --test unstructured_gemm --test attention_gpu -- --nocapture --test-threads=1
if ! grep -q "rel err" "$LOG/tests.log" || grep -q "no GPU: skipped" "$LOG/tests.log"; then
    SUMMARY+=("FAIL  tests did not reach the GPU (no GPU seen?)"); status=1
fi

# 4. compute-sanitizer on the small tests, each test binary run directly.
SAN=""
for c in compute-sanitizer "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/compute-sanitizer/compute-sanitizer \
    .cache/cuda/nvidia/cu13/bin/compute-sanitizer; do
    command -v "$c" >/dev/null 2>&1 && { SAN=$(command -v "$c"); break; }
done
if [[ -z "$SAN" ]]; then
    SUMMARY+=("FAIL  compute-sanitizer not found (install the CUDA toolkit's sanitizer or set PATH)"); status=1
else
    for t in unstructured_gemm attention_gpu; do
        bin=$(cargo test --test "$t" --no-run --message-format=json 2>/dev/null |
            python3 -c 'import json,sys
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]: print(m["executable"])' "$t" | tail -1)
        for tool in memcheck racecheck; do
            step "sanitizer_${tool}_$t" "$SAN" --tool "$tool" --error-exitcode 1 "$bin" small_for_sanitizer --nocapture --test-threads=1
        done
    done
fi

# 5. Benches and peers.
if [[ -z "${SKIP_BENCH:-}" ]]; then
    step bench_gemm cargo bench --bench gemm_unstructured
    step bench_attention cargo bench --bench attention
    step peers python3 tools/bench_peers_unstructured.py --out "$LOG/peers.jsonl"
fi

{
    echo "unstructured GPU run summary ($(date -u))"
    printf '%s\n' "${SUMMARY[@]}"
} | tee "$LOG/summary.txt"
exit $status
