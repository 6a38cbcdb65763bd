#!/usr/bin/env bash
# Every GPU figure of the serving and pretraining benchmarks in one prepared run, for a lent GPU machine
# that cannot reach the network (see bench/README.md). Wheels for what its image lacks travel in .whl/
# (make them with bench/gpu_wheels.sh); chatforge itself runs from the checkout.
#
#   bash bench/gpu_run.sh [decode|serve|decode+serve|pretrain|all] [NANOGPT_MODEL_PY]
#
# Each part has its own time limit so one slow part cannot take the others' results with it; tables go
# to stdout, JSON and logs to $OUT (or bench/results/gpu). The limits add up to more than one device call
# may run (600 s): run `decode serve` as one call and `pretrain` as the next while the machine is warm.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
nanogpt=${2:-}
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

run() {  # run NAME LIMIT_S COMMAND...: log to $out/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -E '^\||speedup|tokens/s|^GPU|^decode|^gpt2|failed|Error|error' 
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s"
}

if [[ $part == decode* || $part == all ]]; then
  run decode 300 python3 bench/decode_speed.py --presets gpt2 --rounds 1 --repeats 2 --out "$out/decode_speed.json"
fi
if [[ $part == *serve || $part == all ]]; then
  run serve 60 python3 bench/serve_load.py --duration 15 --out "$out/serve_load.json"
fi
if [[ $part == pretrain || $part == all ]]; then
  run pretrain 420 python3 bench/pretrain_throughput.py --shape gpt2 --rounds 1 --steps 20 --warmup 5 \
    ${nanogpt:+--nanogpt "$nanogpt"} --json "$out/pretrain_gpt2.json"
fi
