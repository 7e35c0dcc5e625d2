#!/usr/bin/env bash
# The prepared GPU check, run ON THE GPU MACHINE (no cargo, no network there). tools/gpu_check.sh
# builds and stages everything into .device/ and copies this script to .device/check.sh; then one
# device call runs it from the repository root:
#
#   run(carry=[".device"], command="bash .device/check.sh \"$OUT\"", timeout_s=570)
#
#   bash .device/check.sh OUT_DIR [--dry-run] [--only STEP,...] [--budget SECONDS]
#
# Steps, each in its own process under `timeout`, oracle variants first and each risky variant
# in a process of its own (a sticky CUDA fault in one cannot hide the others, kernel review T2):
#   1 probe     identity probes (X = I so Y = W^T exactly) for every GEMM variant
#   2 tests     every GPU test with SDSPARSE_REQUIRE_GPU=1 (lib decompress tests, the activation
#               kernels' norm and pointwise families, cuBLAS, cuBLASLt, cuDNN, 2:4, unstructured,
#               attention), split by variant
#   3 sanitizer compute-sanitizer memcheck on the small cases of every kernel
#   4 pipeline  the GPU pipeline (tests/pipeline.rs): the tiny fixture on CUDA in f32 against
#               diffusers' references (DDIM, Euler, DPM++ 2M; latents < 1e-4), in f16 (latents
#               < 2e-2, image within 2/255 on 99% of pixels) and bf16 (provisional 8e-2), and converted
#               unstructured / 2:4 checkpoints on CUDA against the CPU, expanded (f32, < 1e-4)
#               and through the sparse kernels (f16 activations, < 2e-2); and the dense-only
#               mode of GPUs below 8.0, forced here (SDSPARSE_GPU_ARCH_MODE=dense-only)
#   5 bench     short benches: 2:4 and unstructured GEMM vs cuBLAS (same process), attention;
#               PyTorch peers (cuBLAS, cuSPARSELt via to_sparse_semi_structured, SDPA) if torch
#               with CUDA is installed there
#   6 fullsize  full-size SD2.1-base with random f16 weights synthesised here (sdsparse synth),
#               converted to study-sparse (TE 0.475 / UNet 0.35) and 2:4-UNet checkpoints; each
#               generates 512x512, 50 DDIM steps, CFG 7.5 on the GPU (dense also without CUDA
#               graphs), a 5-step --profile run of each gives the per-op table, and diffusers
#               fp16 (SDPA) runs the same folder in the same run (peers/bench_gpu_peer_sd.py;
#               "peer skipped: ..." without torch / diffusers). $OUT/fullsize.md collects it.
# OUT_DIR gets summary.md (a table of every step: ok / FAIL / timeout / skipped, seconds, log)
# and logs/<step>.log. The run stops starting new steps when --budget (default 500 s) is spent,
# and steps 1-5 stop --reserve seconds (default 240) earlier so that the full-size stage still
# runs (a step started late gets at most 30 s more): the whole run ends within about 9 minutes.
# --dry-run runs everything that needs no GPU (unpacking, every executable's test list, tool
# discovery) and reports the GPU steps as "dry run". Every test step first lists what its filter
# selects and fails when that is nothing (a misspelt filter planted on 2026-11-29 failed the dry run). The sparse kernels' tuning cache is
# $OUT/dispatch.json (SDSPARSE_TUNE_CACHE). Exit status: 0 when every step that ran passed.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root" || exit 1

out="${1:-}"
[[ -n "$out" && "$out" != --* ]] || { sed -n '2,39p' "${BASH_SOURCE[0]}" >&2; exit 2; }
shift
dry=0
only=""
budget=500
reserve=240
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --only) only="$2"; shift ;;
        --budget) budget="$2"; shift ;;
        --reserve) reserve="$2"; shift ;;
        *) echo "check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$out/logs"
summary="$out/summary.md"
start=$(date +%s)
status=0
rows=()

# Unpack the executables (staged compressed to fit the carry limit).
bin=/tmp/sdsparse-device-bin
rm -rf "$bin" && mkdir -p "$bin"
# xz-compressed (gpu_check.sh); Python's tarfile unpacks it where tar has no xz.
if ! tar -xJf "$here/bundle.tar.xz" -C "$bin" 2>/dev/null &&
    ! python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$here/bundle.tar.xz" "$bin"; then
    echo "check.sh: cannot unpack $here/bundle.tar.xz" >&2
    exit 1
fi
export CARGO_MANIFEST_DIR="$root" SDSPARSE_REQUIRE_GPU=1 RUST_BACKTRACE=1 CRITERION_HOME="$out/criterion" \
    SDSPARSE_TUNE_CACHE="$out/dispatch.json"

{
    date -u
    cat "$here/manifest.txt" 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv 2>&1 ||
        echo "no nvidia-smi"
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' 2>&1 | tail -1
} >"$out/env.txt" 2>&1

# cuBLAS(Lt) and cuDNN are loaded at run time by name (libcublasLt.so.13, libcudnn.so.9): use the
# system's, else pip-installed ones (nvidia-cublas / the nvidia cu13 bundle, nvidia-cudnn-cu13 or
# -cu12, e.g. torch's) by putting their lib folders on LD_LIBRARY_PATH.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublasLt\.so\.13'; then
    for m in nvidia.cu13 nvidia.cublas; do
        d=$(python3 -c "import $m, os; print(os.path.join(list($m.__path__)[0], 'lib'))" 2>/dev/null || true)
        if [[ -n "$d" && -e "$d/libcublasLt.so.13" ]]; then
            export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            echo "cuBLAS: $d" >>"$out/env.txt"
            break
        fi
    done
fi
cudnn_dir=""
if ! ldconfig -p 2>/dev/null | grep -q 'libcudnn\.so\.9'; then
    cudnn_dir=$(python3 -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib"))' 2>/dev/null || true)
    [[ -n "$cudnn_dir" && -e "$cudnn_dir/libcudnn.so.9" ]] && export LD_LIBRARY_PATH="$cudnn_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" || cudnn_dir=""
fi
if ldconfig -p 2>/dev/null | grep -q 'libcudnn\.so\.9' || [[ -n "$cudnn_dir" ]]; then
    export SDSPARSE_REQUIRE_CUDNN=1
    echo "cuDNN: found ${cudnn_dir:-(system)}" >>"$out/env.txt"
else
    echo "cuDNN: not found (convolutions run im2col + cuBLAS; the cuDNN test reports itself unchecked)" >>"$out/env.txt"
fi

wanted() { [[ -z "$only" || ",$only," == *",$1,"* ]]; }

# step GROUP NAME TIMEOUT_S [ENV=VALUE ...] -- COMMAND...: runs one process, records a row.
step() {
    local group=$1 name=$2 limit=$3
    shift 3
    local envs=()
    while [[ $# -gt 0 && "$1" != -- ]]; do envs+=("$1"); shift; done
    shift
    wanted "$group" || return 0
    local log="logs/$name.log" left=$((budget - reserve - ($(date +%s) - start)))
    if ((left <= 0)); then
        rows+=("| $group | $name | skipped (budget of ${budget}s spent) | 0 | |")
        return 0
    fi
    ((limit > left + 30)) && limit=$((left + 30)) # the last step may overrun the budget by 30 s
    # A filter that matches no test would pass silently ("running 0 tests"): list what the
    # filter selects first (also in a dry run) and fail the step when it selects nothing.
    local i
    for ((i = 1; i <= $#; i++)); do
        if [[ "${!i}" == "$bin"/test-* ]]; then
            local n
            n=$("${@:i}" --list 2>/dev/null | grep -c ': test$')
            if ((n == 0)); then
                rows+=("| $group | $name | FAIL (the filter selects no test) | 0 | |")
                status=1
                return 0
            fi
            break
        fi
    done
    if ((dry)); then
        echo "dry run: ${envs[*]} $*" >"$out/$log"
        rows+=("| $group | $name | dry run | 0 | $log |")
        return 0
    fi
    echo "=== [$group] $name (limit ${limit}s)"
    local t0 rc
    t0=$(date +%s)
    env "${envs[@]}" timeout -k 5 "$limit" "$@" >"$out/$log" 2>&1
    rc=$?
    local secs=$(($(date +%s) - t0)) result
    case $rc in
        0) result=ok ;;
        124 | 137) result="TIMEOUT"; status=1 ;;
        *) result="FAIL (exit $rc)"; status=1 ;;
    esac
    # A GPU step that printed "skipped" did not reach the GPU: a failure on this machine.
    # A peer without torch / diffusers says "peer skipped: <why>": reported, not a failure.
    if [[ $rc == 0 ]] && grep -q "^peer skipped" "$out/$log"; then
        result="skipped ($(grep -m1 '^peer skipped' "$out/$log" | cut -c15-))"
    elif [[ $rc == 0 ]] && grep -q "skipped" "$out/$log"; then
        result="FAIL (skipped: no GPU?)"
        status=1
    fi
    rows+=("| $group | $name | $result | $secs | $log |")
    tail -n 4 "$out/$log"
}

exe() { echo "$bin/$1"; }

# Every staged executable must at least list its tests here (also in a dry run).
for e in "$bin"/test-* "$bin"/bench-*; do
    if ! "$e" --list >"$out/logs/list-$(basename "$e").txt" 2>&1; then
        rows+=("| setup | list $(basename "$e") | FAIL | 0 | logs/list-$(basename "$e").txt |")
        status=1
    fi
done

# 1. Identity probes: oracle first, then each variant in its own process.
for v in v1 v2 v3; do
    step probe "probe-sp24-$v" 60 SDSPARSE_GPU_VARIANTS=$v -- "$(exe test-sparse24_gemm)" gpu_identity_probe --exact --nocapture
done
for v in naive bm32 bm64 bm128 wgmma; do
    step probe "probe-uns-$v" 60 SDSPARSE_GPU_VARIANTS=$v -- "$(exe test-unstructured_gemm)" gpu_identity_probe --exact --nocapture
done

# 2. Every GPU test (SDSPARSE_REQUIRE_GPU=1: a missing GPU fails instead of skipping).
step tests tests-lib-cuda 90 -- "$(exe test-sdsparse)" ::cuda --skip cuda::norm:: --skip cuda::pointwise:: \
    --skip cuda::tensor_ops:: --skip cuda::blas:: --skip cuda::lt:: --skip cuda::dnn:: --skip cuda::ops:: \
    --test-threads=1 --nocapture
# The activation kernels (norm.cu, pointwise.cu) against their CPU twins, one family per process.
step tests tests-lib-norm 90 -- "$(exe test-sdsparse)" cuda::norm::tests:: --test-threads=1 --nocapture
step tests tests-lib-pointwise 90 -- "$(exe test-sdsparse)" cuda::pointwise::tests:: --test-threads=1 --nocapture
# The pipeline's other kernels (tensor.cu, eltwise sub/mul/div) and the cuBLAS SGEMM mapping.
step tests tests-lib-tensor 90 -- "$(exe test-sdsparse)" cuda::tensor_ops::tests:: --test-threads=1 --nocapture
step tests tests-lib-blas 90 -- "$(exe test-sdsparse)" cuda::blas::tests:: --test-threads=1 --nocapture
# cuBLASLt Linear (bias / GELU+bias epilogues, f32 / f16 / bf16) and cuDNN convolutions against
# the CPU; each prints what ran (cuBLASLt's outcome per case, the cuDNN version and algorithm).
# Without cuDNN on this machine the cuDNN test says "cuDNN unavailable, not checked"; with it
# (SDSPARSE_REQUIRE_CUDNN=1, set above when found) a cuDNN that cannot load fails the step.
step tests tests-lib-cublaslt 90 -- "$(exe test-sdsparse)" cuda::lt::tests:: --test-threads=1 --nocapture
step tests tests-lib-cudnn 90 -- "$(exe test-sdsparse)" cuda::dnn::tests:: --test-threads=1 --nocapture
# The model ops with f16 / bf16 activations (GemmEx, flash and scores attention, upcast range)
# against the f32 CPU reference.
step tests tests-lib-ops-half 120 -- "$(exe test-sdsparse)" cuda::ops::tests:: --test-threads=1 --nocapture
for v in v1 v2 v3; do
    step tests "tests-sp24-$v" 120 SDSPARSE_GPU_VARIANTS=$v -- "$(exe test-sparse24_gemm)" gpu_ --test-threads=1 --nocapture
done
for v in naive bm32,bm64,bm128 wgmma; do
    step tests "tests-uns-${v//,/-}" 120 SDSPARSE_GPU_VARIANTS=$v -- "$(exe test-unstructured_gemm)" gpu_ --test-threads=1 --nocapture
done
# The library's SparseLinear (2:4 and bitmap kernels through the public API) against the CPU.
step tests tests-sparse-linear 90 -- "$(exe test-sparse_linear)" ::cuda --test-threads=1 --nocapture
for v in naive flash; do
    step tests "tests-attn-$v" 120 SDSPARSE_GPU_VARIANTS=$v -- "$(exe test-attention_gpu)" gpu_ --test-threads=1 --nocapture
done

# 3. compute-sanitizer memcheck on small cases of every kernel.
san=""
for c in compute-sanitizer /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if command -v "$c" >/dev/null 2>&1; then san=$(command -v "$c"); break; fi
done
if [[ -z "$san" ]] && ls "$here"/nvidia_cuda_sanitizer_api-*.whl >/dev/null 2>&1; then
    sdir=/tmp/sdsparse-sanitizer
    rm -rf "$sdir"
    whl=$(find "$here" -maxdepth 1 -name 'nvidia_cuda_sanitizer_api-*.whl' | head -1)
    if python3 -m zipfile -e "$whl" "$sdir" 2>/dev/null; then
        s=$(find "$sdir" -name compute-sanitizer -type f | head -1)
        [[ -n "$s" ]] && chmod +x "$s" && san="$s"
    fi
fi
echo "compute-sanitizer: ${san:-not found}" >>"$out/env.txt"
if [[ -z "$san" ]]; then
    if wanted sanitizer; then
        rows+=("| sanitizer | memcheck | FAIL (compute-sanitizer not found, nor a staged wheel) | 0 | |")
        status=1
    fi
else
    for t in "test-sparse24_gemm gpu_small_for_sanitizer" "test-unstructured_gemm gpu_gemm_small_for_sanitizer" \
        "test-attention_gpu gpu_attention_small_for_sanitizer" "test-sdsparse decompress_matches_reference::cuda" \
        "test-sdsparse cuda::norm::tests::layer_norm_matches_cpu::cuda" "test-sdsparse cuda::pointwise::tests::upsample_matches_cpu::cuda" \
        "test-sdsparse cuda::pointwise::tests::add_and_cfg_match_cpu::cuda" "test-sdsparse cuda::norm::tests::group_norm_matches_cpu::cuda" \
        "test-sparse_linear sparse_linear_matches_the_reference::cuda" \
        "test-sdsparse cuda::tensor_ops::tests::softmax_matches_cpu::cuda" "test-sdsparse cuda::tensor_ops::tests::im2col_matches_cpu::cuda" \
        "test-sdsparse cuda::tensor_ops::tests::strided_copies_match_cpu::cuda" "test-sdsparse cuda::blas::tests::sgemm_matches_cpu::cuda" \
        "test-sdsparse cuda::lt::tests::lt_linear_matches_cpu::cuda" \
        "test-sdsparse cuda::blas::tests::gemm_ex_matches_cpu::cuda"; do
        # (cuDNN is not run under memcheck: loading its engine libraries under the sanitizer could
        # take most of the budget; its descriptors are checked against cuDNN's own shapes.)
        read -r e filter <<<"$t"
        label="${filter%::cuda}" && label="${label##*::}" # one log per case, not per executable
        step sanitizer "memcheck-${e#test-}-$label" 150 -- "$san" --tool memcheck --error-exitcode 1 "$(exe "$e")" "$filter" --test-threads=1 --nocapture
    done
fi

# 4. The GPU pipeline on the tiny fixture: dense against diffusers with f32, f16 and bf16
# activations, then the sparse checkpoints against the CPU, expanded (f32 activations) and
# through the sparse kernels (f16 activations).
step pipeline pipeline-dense-f32 120 -- "$(exe test-pipeline)" _matches_diffusers::cuda --test-threads=1 --nocapture
# The same with the library paths forced off (im2col + cuBLAS convolutions, SGEMM + bias kernel
# Linears), so both backends are held to diffusers in one run; each run prints the "GPU: conv
# ..., dense Linear ..." line naming what ran.
step pipeline pipeline-dense-f32-fallbacks 120 SDSPARSE_GPU_CONV=im2col SDSPARSE_GPU_LINEAR=sgemm -- \
    "$(exe test-pipeline)" ddim_matches_diffusers::cuda --exact --nocapture
step pipeline pipeline-dense-f16 120 -- "$(exe test-pipeline)" gpu_f16_matches_diffusers --exact --nocapture
step pipeline pipeline-dense-bf16 120 -- "$(exe test-pipeline)" gpu_bf16_matches_diffusers --exact --nocapture
step pipeline pipeline-sparse-expanded 120 SDSPARSE_GPU_SPARSE=dense -- "$(exe test-pipeline)" gpu_sparse_checkpoints_match_cpu --exact --nocapture
step pipeline pipeline-sparse-kernels 120 -- "$(exe test-pipeline)" gpu_sparse_checkpoints_match_cpu --exact --nocapture
# CUDA graphs of the UNet step: replayed steps give the eager steps' latents.
step pipeline pipeline-cuda-graphs 90 -- "$(exe test-pipeline)" gpu_cuda_graphs_match_eager_steps --exact --nocapture
# The dense-only mode of GPUs below 8.0 (Turing), forced on this GPU: the tiny model in f16 with
# attention on the scores path against diffusers, converted 2:4 / unstructured checkpoints
# expanded at load (no sparse Linear runs) against the CPU; SparseLinear through the API
# (expanded at placement, the sparse kernels refused) against the CPU reference.
step pipeline pipeline-dense-only 150 SDSPARSE_GPU_ARCH_MODE=dense-only -- "$(exe test-pipeline)" \
    gpu_dense_only_mode_expands_sparse_weights_and_matches_diffusers --exact --nocapture
step pipeline sparse-linear-dense-only 60 SDSPARSE_GPU_ARCH_MODE=dense-only -- "$(exe test-sdsparse)" \
    sparse_linear::tests:: --test-threads=1 --nocapture

# 5. Short benches (cuBLAS dense f16 in the same process) and the PyTorch peers.
crit=(--bench --warm-up-time 0.2 --measurement-time 0.4 --sample-size 10)
step bench bench-gemm_sparse24 120 -- "$(exe bench-gemm_sparse24)" "${crit[@]}"
step bench bench-gemm_unstructured 120 -- "$(exe bench-gemm_unstructured)" "${crit[@]}"
step bench bench-attention 90 -- "$(exe bench-attention)" "${crit[@]}"
if python3 -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1 || ((dry)); then
    step bench peers-gemm-sp24 120 -- python3 "$here/peers/bench_peers_gemm.py" --json "$out/peers_sp24.json"
    step bench peers-unstructured-attention 120 -- python3 "$here/peers/bench_peers_unstructured.py" --out "$out/peers.jsonl" --iters 20 --repeats 3
else
    wanted bench && rows+=("| bench | PyTorch peers | skipped (no torch with CUDA on this machine) | 0 | |")
fi

# 6. Full size: SD2.1-base, random f16 weights, 512x512, 50 DDIM steps, CFG, against diffusers fp16.
reserve=0
fs=/tmp/sdsparse-fullsize
sds="$(exe sdsparse)"
prompt="a photograph of an astronaut riding a horse"
gen=(generate --prompt "$prompt" --guidance 7.5 --scheduler ddim --width 512 --height 512 --seed 0 --device cuda --force)
if wanted fullsize && ((!dry)); then rm -rf "$fs"; mkdir -p "$fs" "$out/fullsize"; fi
step fullsize fullsize-synth 150 -- "$sds" synth --preset sd2.1-base --dtype f16 --out "$fs/dense" --force
step fullsize fullsize-dense 90 -- "$sds" "${gen[@]}" --steps 50 --model "$fs/dense" --out "$out/fullsize/dense.png"
# diffusers fp16 (SDPA) on the same folder; its wheel is staged (the machine has no network).
pyp=/tmp/sdsparse-py
if wanted fullsize && ((!dry)) && ls "$here"/diffusers-*.whl >/dev/null 2>&1; then
    rm -rf "$pyp" && python3 -m zipfile -e "$(find "$here" -maxdepth 1 -name 'diffusers-*.whl' | head -1)" "$pyp" 2>/dev/null
fi
step fullsize peer-diffusers-fp16 150 PYTHONPATH="$pyp:${PYTHONPATH:-}" -- python3 "$here/peers/bench_gpu_peer_sd.py" "$fs/dense" --json "$out/fullsize/peer.json"
step fullsize fullsize-convert-study 90 -- "$sds" convert --model "$fs/dense" --out "$fs/study" --force
step fullsize fullsize-study 90 -- "$sds" "${gen[@]}" --steps 50 --model "$fs/study" --out "$out/fullsize/study.png"
step fullsize fullsize-convert-24 90 -- "$sds" convert --model "$fs/dense" --out "$fs/unet24" --text-encoder-sparsity 0 --unet-pattern 2:4 --force
step fullsize fullsize-unet24 90 -- "$sds" "${gen[@]}" --steps 50 --model "$fs/unet24" --out "$out/fullsize/unet24.png"
for c in dense study unet24; do
    step fullsize "fullsize-profile-$c" 60 -- "$sds" "${gen[@]}" --steps 5 --profile --model "$fs/$c" --out "$out/fullsize/profile-$c.png"
done
step fullsize fullsize-dense-nographs 90 -- "$sds" "${gen[@]}" --steps 50 --model "$fs/dense" --no-cuda-graphs --out "$out/fullsize/dense-nographs.png"
if wanted fullsize; then
    {
        echo "# Full-size SD2.1-base (random f16 weights), 512x512, 50 DDIM steps, CFG 7.5"
        for l in "$out"/logs/fullsize-{dense,study,unet24,dense-nographs}.log "$out"/logs/peer-diffusers-fp16.log; do
            [[ -f "$l" ]] || continue
            echo; echo "## $(basename "$l" .log)"; echo '```'
            grep -E "^(generating|device|diffusers|note|peer|torch)|^  (load|text encoder|UNet|VAE decode|generate|GPU weights|on the GPU|total)" "$l"
            echo '```'
        done
        for l in "$out"/logs/fullsize-profile-*.log; do
            [[ -f "$l" ]] || continue
            echo; echo "## $(basename "$l" .log) (5 steps, stream synchronised around every op, graphs off)"; echo '```'
            sed -n '/^per-op time/,$p' "$l" | grep -v "^wrote"
            echo '```'
        done
    } >"$out/fullsize.md"
fi

{
    echo "# sdsparse GPU check ($(date -u +%Y-%m-%dT%H:%MZ)$( ((dry)) && echo ', DRY RUN: no GPU step ran'))"
    echo
    echo '```'
    cat "$out/env.txt"
    echo '```'
    echo
    echo "| group | step | result | s | log |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "Total $(($(date +%s) - start)) s; overall: $([[ $status == 0 ]] && echo PASS || echo FAIL)."
} >"$summary"
cat "$summary"
exit $status
