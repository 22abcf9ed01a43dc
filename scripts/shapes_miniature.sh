#!/usr/bin/env bash
# The miniature of the paper: every method on the shapes benchmarks (held-out seed 1), one table.
# Usage: scripts/shapes_miniature.sh [MODEL_DIR] [OUT_DIR]   (default: the shipped model, runs/shapes)
# Runs resume: rerun the script after an interruption.
set -euo pipefail
BIN=${BIN:-.venv/bin}
MODEL=${1:-src/unclutter/shapes/weights}
OUT=${2:-runs/shapes}
DATA=build/shapes/test
[ -f "$DATA/vqa.jsonl" ] || "$BIN/unclutter" data shapes --out "$DATA" --num 500 --seed 1 --if-per-task 10
run() {  # name method [--set ...]
  local name=$1 method=$2; shift 2
  "$BIN/unclutter" eval --model "$MODEL" --method "$method" --bench gqa --data "$DATA/vqa.jsonl" \
    --images "$DATA/images" --out "$OUT/vqa-$name" --batch-size 16 --max-new-tokens 16 "$@"
  "$BIN/unclutter" eval --model "$MODEL" --method "$method" --bench if16 --data "$DATA/if16.jsonl" \
    --images "$DATA/images" --out "$OUT/if-$name" --batch-size 16 --max-new-tokens 96 "$@"
}
run stock stock
run spd8 spd --set spd.grid=8      # 64 tokens
run spd4 spd --set spd.grid=4      # 16 tokens
run vmtc vmtc                      # 50%: 72 tokens
run vmtc36 vmtc --set vmtc.num_tokens=36
run cmai cmai
run vmtc+cmai vmtc+cmai
"$BIN/unclutter" report "$OUT"/vqa-* "$OUT"/if-* --out "$OUT/report"
