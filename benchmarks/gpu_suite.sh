#!/usr/bin/env bash
# The GPU forms of adamba's benchmarks in one run on one GPU, about 8 minutes, one JSON per benchmark:
#
#   benchmarks/gpu_suite.sh [--out DIR]          # on a GPU node (results: DIR, default benchmarks/results/gpu-DATE)
#   benchmarks/gpu_suite.sh --smoke [--out DIR]  # the same script on a CPU in about a minute (tests/test_gpu_suite.py)
#
# Each benchmark runs under its own time limit, writes its table to NAME.log and its JSON line to NAME.json; one that
# fails or runs out of time is reported and the others still run; the script exits 1 if any failed. The runs, with
# their controls written inside each benchmark (BENCHMARKS.md):
#   train_throughput_d12, _d20  training tokens/s and MFU, bf16 autocast, torch.compile, against the control transformer
#   train_throughput_d12_float8 the same d12 with float8 matmuls (torchao), against the control under torchao's swap
#   infer                       prefill and decode of the cached engine against full recompute, bf16
#   scan_kernels                mamba_ssm's fused scans (when they import) against adamba's PyTorch scans
#   elastic                     decode speed per compute mode against what its FLOPs predict, eager and compiled
#   speculative                 self-speculative decoding against plain decoding (a wider model trained first)
#   serve                       continuous batching against one request at a time, through HTTP
set -uo pipefail

cd "$(dirname "$0")/.."
SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "gpu_suite.sh: unknown argument $1 (use --smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."

if [ "$SMOKE" = 1 ]; then
  LIMIT=120
  COMMON=(--smoke --threads 1)
else
  LIMIT=150
  COMMON=()
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: no CUDA device visible; run it on a GPU node, or with --smoke on a CPU" >&2
    exit 2
  fi
fi

failed=()
run() {  # run NAME SCRIPT [GPU-ONLY ARGS...] [-- ARGS FOR BOTH...]: GPU arguments are dropped under --smoke
  local name="$1" script="$2"; shift 2
  local args=() both=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
  [ $# -gt 0 ] && shift && both=("$@")
  [ "$SMOKE" = 1 ] && args=()
  args+=("${both[@]}")
  echo "== $name" >&2
  local start=$SECONDS
  if timeout "$LIMIT" "$PYTHON" "benchmarks/$script.py" "${COMMON[@]}" "${args[@]}" > "$OUT/$name.log" 2> "$OUT/$name.err" \
      && tail -n 1 "$OUT/$name.log" | "$PYTHON" -c "import json, sys; json.loads(sys.stdin.read())" 2> /dev/null; then
    tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
    echo "   ok in $((SECONDS - start)) s -> $OUT/$name.json" >&2
  else
    echo "   FAILED after $((SECONDS - start)) s (see $OUT/$name.err)" >&2
    tail -n 5 "$OUT/$name.err" >&2
    failed+=("$name")
  fi
}

run train_throughput_d12 train_throughput --device cuda --depth 12 --head-dim 128 --sequence-len 2048 --batch-size 8 \
    --vocab-size 32768 --repeats 5 --compile
run train_throughput_d20 train_throughput --device cuda --depth 20 --head-dim 128 --sequence-len 2048 --batch-size 4 \
    --vocab-size 32768 --repeats 5 --compile
run train_throughput_d12_float8 train_throughput --device cuda --depth 12 --head-dim 128 --sequence-len 2048 \
    --batch-size 8 --vocab-size 32768 --repeats 3 --compile -- --float8 tensorwise
run infer infer --device cuda --dtype bfloat16 --depth 12 --head-dim 128 --contexts 512,2048 --batches 1,8 --repeats 3
run scan_kernels scan_kernels --device cuda --lengths 2048,8192 --repeats 5
run elastic elastic --device cuda --repeats 5
run speculative speculative --device cuda --demo "" --repeats 2
run serve serve --clients 1,8 --requests 2

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_suite.sh: ${#failed[@]} failed: ${failed[*]} (results in $OUT)" >&2
  exit 1
fi
echo "gpu_suite.sh: all passed; results in $OUT" >&2
