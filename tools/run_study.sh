#!/usr/bin/env bash
# Reproduces docs/STUDY.md's measurements on the toy model: the sweeps below, then copies each
# sweep's results.csv and curves.png (and the 2:4 grid.png) to docs/study/NAME/ (images stay in $WORK).
# Usage: bash tools/run_study.sh [WORK_DIR]   (after cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/sdsparse-study}
BIN=./target/release/sdsparse
MODEL=assets/toy-shapes
COMMON=(--model "$MODEL" --seeds 1 --steps 20 --device cpu)
run() {
  local name=$1; shift
  "$BIN" sweep "${COMMON[@]}" --out "$WORK/$name" "$@"
  mkdir -p "docs/study/$name"
  cp "$WORK/$name/results.csv" "$WORK/$name/curves.png" "docs/study/$name/"
  # Grids are large (rows x prompts of images): committed only for the small 2:4 sweep.
  if [ "$name" = sparse24 ]; then cp "$WORK/$name/grid.png" "docs/study/$name/"; fi
}
# Magnitude vs random, per component, per layer, unstructured, Linear layers only.
run main --components text-encoder,unet,both --methods magnitude,random --sparsities 0:0.9:0.1
# One threshold per component.
run global --components text-encoder,unet,both --methods magnitude --scope global --sparsities 0:0.9:0.1
# 2:4 (exactly 50%).
run sparse24 --components text-encoder,unet,both --methods magnitude,random --pattern 2:4 --sparsities 0.5
# Magnitude vs Wanda vs OWL (issue 13), calibrated on every caption of the toy's grammar (90 scenes, shuffled with seed 0;
# the UNet on 16 of them, 4 DDIM steps each).
run methods --components text-encoder,unet --methods magnitude,wanda,owl --sparsities 0:0.9:0.1 \
  --calibration-prompts docs/study/methods/calibration_prompts.txt --calibration-samples 90
# The UNet's convolutions pruned too.
run conv --components unet,both --methods magnitude --include-conv --sparsities 0:0.9:0.1
