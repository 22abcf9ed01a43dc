#!/usr/bin/env bash
# What the next short GPU lease measures, in priority order, in one call (a lease allows one command of at most
# 10 minutes and about 15 minutes of device time in all, start included). Usage:
#   scripts/gpu_lease.sh OUT_DIR [DEADLINE_S]
# 1. decoding into a static cache with the decode step compiled (CUDA graphs): stock, CMAI, VMTC+CMAI
# 2. the same on the dynamic cache, eager: the baseline on the same card
# 3. the vision tower compiled with mode="reduce-overhead" (CUDA graphs): stock, VMTC
# each on LLaVA-1.5-7B, then Gemma-3-4B (scripts/gpu_bench.sh, one process per preset, under shares of the deadline).
# The device has no internet: wheels carried in .whl/ (`pip download --no-deps transformers==X -d .whl` here) are
# installed into /tmp/site first.
set -u
out=${1:?usage: scripts/gpu_lease.sh OUT_DIR [DEADLINE_S]}
deadline=${2:-540}
start=$SECONDS
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | grep -o -i -E 'h100|h200|a100|l40s' | head -n 1)
export TAG=${TAG:-$(echo "${gpu:-gpu}" | tr 'A-Z' 'a-z')} EXACT=0 MICRO=none
left() { echo $(( deadline - (SECONDS - start) )); }
CACHE=static METHODS=stock,cmai,vmtc+cmai scripts/gpu_bench.sh "$out/static" $(( $(left) * 45 / 100 )) llava-1.5-7b gemma-3-4b
METHODS=stock,cmai,vmtc+cmai scripts/gpu_bench.sh "$out/dynamic" $(( $(left) / 2 )) llava-1.5-7b gemma-3-4b
COMPILE=reduce-overhead METHODS=stock,vmtc scripts/gpu_bench.sh "$out/compiled_tower" "$(left)" llava-1.5-7b gemma-3-4b
cat "$out"/*/log.txt
