#!/usr/bin/env bash
# stable-diffusion.cpp (leejet/stable-diffusion.cpp, CPU, built from source) on an SD2.1-base checkpoint in the
# original single-file layout: wall time, per-stage times from its own log, peak RSS (/usr/bin/time -v).
#
#   tools/bench_sdcpp.sh build SRC BUILD        # cmake Release build of SRC (with its ggml submodule checked out)
#   tools/bench_sdcpp.sh run BUILD MODEL.safetensors LOG [STEPS] [SIZE] [THREADS]
#
# SRC is a checkout of stable-diffusion.cpp whose ggml/ holds the submodule's pinned commit (the session that made
# docs/BENCHMARKS.md used stable-diffusion.cpp 97d29908 with ggml 8e800cef). Nothing of it is committed here; keep
# SRC and BUILD outside the repository (e.g. under /tmp). MODEL comes from
#   sdsparse synth --preset sd2.1-base --dtype f16 --out /tmp/sd21b
#   sdsparse export --model /tmp/sd21b --out /tmp/sd21b.safetensors --format single-file
# The run matches tools/bench_cpu_peers.py and `sdsparse generate` in cost: 512x512, CFG 7.5, the given steps, one
# seed. Its sampler list has no DDIM (only "ddim_trailing", not SD2's "leading" spacing), so it runs `euler`: one
# UNet call (the CFG pair) per step, like DDIM, so the time per step is comparable; the image is not.
set -euo pipefail
cmd=${1:?usage: bench_sdcpp.sh build SRC BUILD | run BUILD MODEL LOG [STEPS] [SIZE] [THREADS]}
case "$cmd" in
build)
    src=${2:?SRC}; build=${3:?BUILD}
    [ -f "$src/ggml/CMakeLists.txt" ] || { echo "error: $src/ggml is empty (check out the ggml submodule first)" >&2; exit 2; }
    command -v cmake >/dev/null || { echo "error: cmake not found (pip install cmake)" >&2; exit 2; }
    # Source snapshots without large files lack the embedded vocabularies of tokenizers SD2 never uses
    # (Gemma, Mistral, Qwen, T5, ...). Stub those that are missing with an empty array so vocab.cpp
    # compiles; CLIP's (clip_merges.hpp, SD2's tokenizer) must be the real one.
    vocab="$src/src/tokenizers/vocab"
    [ -s "$vocab/clip_merges.hpp" ] || { echo "error: $vocab/clip_merges.hpp missing (SD2's CLIP merges)" >&2; exit 2; }
    for pair in gemma2_merges:gemma2_merges_utf8_c_str gemma2_vocab:gemma2_vocab_json_utf8_c_str \
        gemma_merges:gemma_merges_utf8_c_str gemma_vocab:gemma_vocab_json_utf8_c_str \
        gpt_oss_merges:gpt_oss_merges_utf8_c_str gpt_oss_vocab:gpt_oss_vocab_json_utf8_c_str \
        mistral_merges:mistral_merges_utf8_c_str mistral_vocab:mistral_vocab_json_utf8_c_str \
        qwen_merges:qwen2_merges_utf8_c_str t5:t5_tokenizer_json_str umt5:umt5_tokenizer_json_str; do
        f="$vocab/${pair%%:*}.hpp"
        [ -s "$f" ] || { echo "static const unsigned char ${pair#*:}[] = {0};" >"$f"; echo "stubbed $f (not used by SD2)"; }
    done
    # GGML_NATIVE: -march=native, so ggml uses this CPU's AVX-512 as PyTorch and sdsparse do.
    cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DSD_WEBP=OFF -DSD_WEBM=OFF \
        -DSD_BUILD_SHARED_LIBS=OFF >/dev/null
    cmake --build "$build" --config Release -j "${JOBS:-2}" --target sd-cli 2>&1 | tail -3
    ls -l "$build/bin/sd-cli"
    ;;
run)
    build=${2:?BUILD}; model=${3:?MODEL}; log=${4:?LOG}; steps=${5:-2}; size=${6:-512}; threads=${7:-$(nproc)}
    bin="$build/bin/sd-cli"
    [ -x "$bin" ] || { echo "error: $bin not built (bench_sdcpp.sh build first)" >&2; exit 2; }
    [ -f "$model" ] || { echo "error: no model file $model" >&2; exit 2; }
    out=$(mktemp -d)/sdcpp.png
    {
        echo "# stable-diffusion.cpp $(git -C "$build/.." rev-parse --short HEAD 2>/dev/null || true) $(date -u +%FT%TZ) $(nproc) cores"
        echo "# $bin -m $model -W $size -H $size --steps $steps --cfg-scale 7.5 --sampling-method euler -s 0 -t $threads"
        /usr/bin/time -v "$bin" -m "$model" -p "a photograph of an astronaut riding a horse" -n "" \
            -W "$size" -H "$size" --steps "$steps" --cfg-scale 7.5 --sampling-method euler -s 0 -t "$threads" \
            -o "$out" -v 2>&1
    } >"$log" 2>&1 || { tail -5 "$log" >&2; exit 1; }
    wall=$(grep 'Elapsed (wall clock)' "$log" | awk '{print $NF}')
    rss_kb=$(grep 'Maximum resident set size' "$log" | awk '{print $NF}')
    echo "sdcpp wall=$wall peak_rss=$(awk "BEGIN{printf \"%.2f GB\", $rss_kb/1e6}")"
    # Its own stage lines (text encoding, sampling, per-step, decode), as it prints them.
    grep -E 'Version: |completed|s\/it' "$log" | tail -8 || true
    ;;
*) echo "error: unknown command $cmd" >&2; exit 2 ;;
esac
