#!/usr/bin/env bash
# The miniature of the paper (`make miniature`): builds, then every condition on the held-out shapes data.
# Builds and evaluations interleave so that the first seed's tables exist early: seed 0 (both recipes) ->
# miniature -> seeds 1, 2 -> miniature -> VMTC-only and CMAI-only trained (seed 0) -> miniature.
# Everything resumes: rerun the script after an interruption. Results: benchmarks/miniature/results.{md,json}.
set -euo pipefail
BIN=${BIN:-.venv/bin}
ROOT=${ROOT:-build/mini}
SEEDS=${SEEDS:-0 1 2}
build() { "$BIN/python" -m unclutter.mini.build --root "$ROOT" --recipe "$1" --seed "$2"; }
miniature() { "$BIN/python" -m unclutter.mini.miniature --root "$ROOT" --seeds "$(echo $SEEDS | tr ' ' ,)"; }
first=${SEEDS%% *}
build stock "$first"
build method "$first"
miniature
for seed in $SEEDS; do
  build stock "$seed"
  build method "$seed"
done
miniature
build vmtc "$first"
build cmai "$first"
miniature
