#!/usr/bin/env bash
# End-to-end CPU comparison, one tool at a time, in rounds (docs/BENCHMARKS.md, "End to end on CPU"):
# sdsparse before / after (two release binaries), diffusers (tools/bench_cpu_peers.py) and
# stable-diffusion.cpp (tools/bench_sdcpp.sh), 512x512, DDIM, CFG 7.5, STEPS steps, seed 0, all threads.
#
#   tools/bench_cpu_e2e.sh SDSPARSE_BEFORE SDSPARSE_AFTER MODEL_DIR MODEL_FILE SDCPP_BUILD LOGDIR [ROUNDS] [STEPS]
#
# MODEL_DIR: `sdsparse synth --preset sd2.1-base --dtype f16 --out MODEL_DIR`; MODEL_FILE: its
# `sdsparse export --format single-file` copy (stable-diffusion.cpp reads the original layout).
# Each run is timed by /usr/bin/time -v (wall, peak RSS); each log keeps the tool's own stage times.
set -euo pipefail
before=${1:?}; after=${2:?}; dir=${3:?}; file=${4:?}; sdcpp=${5:?}; logs=${6:?}; rounds=${7:-2}; steps=${8:-2}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$logs"
images=$(mktemp -d)
prompt="a photograph of an astronaut riding a horse"
summary() { # LOG: wall, CPU seconds (user + system), CPU share and peak RSS from /usr/bin/time -v
    echo "  wall $(grep 'Elapsed (wall clock)' "$1" | awk '{print $NF}'), cpu s $(grep -E '(User|System) time' "$1" | awk '{s+=$NF} END {printf "%.1f", s}') ($(grep 'Percent of CPU' "$1" | awk '{print $NF}')), peak RSS $(grep 'Maximum resident' "$1" | awk '{printf "%.2f GB", $NF/1e6}')"
}
for r in $(seq 1 "$rounds"); do
    for tool in sdsparse-before sdsparse-after diffusers sdcpp; do
        log="$logs/e2e_${tool}_${steps}steps_r$r.log"
        echo "== round $r: $tool ($(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
        case $tool in
        sdsparse-*)
            bin=$before; [ "$tool" = sdsparse-after ] && bin=$after
            /usr/bin/time -v "$bin" generate --model "$dir" --prompt "$prompt" --steps "$steps" --guidance 7.5 \
                --scheduler ddim --seed 0 --width 512 --height 512 --out "$images/$tool.png" --force >"$log" 2>&1
            grep -E '^  (load|text encoder|UNet|VAE decode) ' "$log" || true ;;
        diffusers)
            /usr/bin/time -v python3 "$here/bench_cpu_peers.py" "$dir" --steps "$steps" --size 512 >"$log" 2>&1
            grep -E '^  (load|text encoder|UNet|VAE decode|generate) ' "$log" || true ;;
        sdcpp)
            "$here/bench_sdcpp.sh" run "$sdcpp" "$file" "$log" "$steps" 512 ;;
        esac
        summary "$log"
    done
done
rm -rf "$images"
