#!/usr/bin/env bash
# The full-size speed presets on one GPU, each in its own process (one failing preset does not stop the others),
# under a deadline so the whole run fits a short GPU lease. Usage:
#   scripts/gpu_bench.sh OUT_DIR [DEADLINE_S] [PRESET ...]     (PRESET "none": only the micro smoke runs)
# Writes OUT_DIR/NAME_<gpu>_batch1.json per preset (the .md and .png beside them go to $EXTRA) and
# OUT_DIR/log.txt. Then, while time is left: the family exactness contract on the device (EXACT=0 skips it), and
# a smoke run of every family's micro preset.
set -u
out=${1:?usage: scripts/gpu_bench.sh OUT_DIR [DEADLINE_S] [PRESET ...]}
deadline=${2:-480}
shift $(( $# >= 2 ? 2 : $# ))
presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(qwen2.5-vl-7b gemma-3-4b llava-next-7b llava-1.5-7b)
device=${DEVICE:-cuda}
tag=${TAG:-h200}
reps=${REPS:-3}
# METHODS (comma-separated, e.g. stock,vmtc,cmai,vmtc+cmai) limits the methods; default: all of them
# COMPILE (a torch.compile mode, e.g. reduce-overhead) compiles every method's vision tower; the JSON gets a _MODE suffix
# (2 warm-up calls: the first compiles, the second records the CUDA graphs)
# CACHE=static decodes into a static cache with the decode step compiled (CUDA graphs); the JSON gets a _static suffix
extra=${EXTRA:-/tmp/gpu_bench_extra}  # only the JSONs and the log go to OUT_DIR (a GPU lease returns few files)
mkdir -p "$extra" "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1
start=$SECONDS
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >>"$log" 2>&1
for p in "${presets[@]}"; do
  [ "$p" = none ] && continue
  left=$(( deadline - (SECONDS - start) ))
  if [ $left -lt 60 ]; then echo "SKIP $p: ${left}s left" >>"$log"; continue; fi
  t0=$SECONDS
  timeout $(( left - 10 )) python3 -m unclutter.cli bench speed --preset "$p" --device "$device" --reps "$reps" \
    ${METHODS:+--methods "$METHODS"} ${COMPILE:+--compile-vision "$COMPILE"} ${CACHE:+--cache "$CACHE"} \
    ${COMPILE:+--warmup 2} ${CACHE:+--warmup 2} --out "$extra/${p}_${tag}_batch1${COMPILE:+_$COMPILE}${CACHE:+_$CACHE}.json" \
    >>"$log" 2>&1
  rc=$?
  echo "DONE $p rc=$rc in $(( SECONDS - t0 ))s" >>"$log"
  mv "$extra/${p}_${tag}_batch1${COMPILE:+_$COMPILE}${CACHE:+_$CACHE}.json" "$out/" 2>/dev/null
done
# the exactness contract of every family (tests/test_families.py) on the device: naive Eq. 9-11 reference, cached
# decoding == one full forward, batch == single, ratio 1.0 == stock, remove() (needs pytest there; SmolVLM's
# processor needs num2words)
left=$(( deadline - (SECONDS - start) ))
if [ "${EXACT:-1}" = 1 ] && [ $left -ge 90 ]; then
  python3 -c "import num2words" 2>/dev/null && skip=() || skip=(-k "not smolvlm")
  python3 -c "import xdist" 2>/dev/null && skip+=(-n 4)  # four processes share the device
  UNCLUTTER_TEST_DEVICE=$device timeout $(( left - 30 )) python3 -m pytest -p no:cacheprovider \
    tests/test_families.py "${skip[@]}" >"$extra/exact.log" 2>&1
  echo "EXACT on $device rc=$? $(tail -n 1 "$extra/exact.log")" >>"$log"
  grep -E "^(FAILED|ERROR)" "$extra/exact.log" | head -n 30 >>"$log"
fi
for f in ${MICRO:-llava qwen2_5_vl qwen3_vl gemma3 internvl idefics3 smolvlm llava_next llava_onevision}; do
  [ "$f" = none ] && continue
  left=$(( deadline - (SECONDS - start) ))
  if [ $left -lt 20 ]; then echo "SKIP micro-$f: ${left}s left" >>"$log"; continue; fi
  timeout $(( left - 5 )) python3 -m unclutter.cli bench speed --preset "micro-$f" --device "$device" --reps 1 \
    --out "$extra/micro.json" >"$extra/micro.log" 2>&1
  rc=$?
  echo "SMOKE micro-$f rc=$rc" >>"$log"
  [ $rc -eq 0 ] || tail -n 25 "$extra/micro.log" >>"$log"
done
echo "total $(( SECONDS - start ))s" >>"$log"
