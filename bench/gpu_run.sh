#!/usr/bin/env bash
# Every GPU check and figure in one prepared run, for a lent GPU machine that cannot reach the network
# (see bench/README.md). Wheels for what its image lacks travel in .whl/ (make them with
# bench/gpu_wheels.sh) and are installed into its Python (a throwaway machine); chatforge runs from the checkout.
#
#   bash bench/gpu_run.sh [PARTS] [NANOGPT_MODEL_PY]     PARTS: tests+decode+serve (default), pretrain, profile, all
#
# Each part has its own time limit, so one slow part cannot take the others' results with it; tables go
# to stdout, JSON and logs to $OUT (or bench/results/gpu). `tests+decode+serve` fits one device call
# (about 6 minutes), `pretrain+profile` another.
set -uo pipefail
cd "$(dirname "$0")/.."
parts=${1:-tests+decode+serve}
[[ $parts == all ]] && parts=tests+decode+serve+pretrain+profile
nanogpt=${2:-}
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true TRANSFORMERS_VERBOSITY=error
if ls .whl/*.whl >/dev/null 2>&1 && [[ ! -e /tmp/.chatforge-wheels ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl 2>&1 | grep -v WARNING
  touch /tmp/.chatforge-wheels
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import sys, torch, transformers, accelerate; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

run() {  # run NAME LIMIT_S COMMAND...: log to $out/NAME.log, show the lines that matter, say how it ended
  local name=$1 override="LIMIT_${1^^}"; local limit=${!override:-$2}; shift 2  # LIMIT_TESTS=120 ... overrides
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -E '^\||speedup|^round|^GPU|^device|^decode|^gpt2|engine bf16 without|bf16 engine vs|llama 60|Error|error:|FAILED|ERROR|passed|failed' \
    "$out/$name.log" | grep -v '^  File' | cut -c1-400 | tail -60
  echo "== $name: exit $rc after $((SECONDS - start))s"
}

# a rerun can narrow the tests and decode paths: GPU_TESTS="tests/test_gpu.py" DECODE_PATHS=engine,eager
tests=${GPU_TESTS:-tests/test_gpu.py tests/test_engine.py tests/test_speed.py tests/test_pretrain.py tests/test_sft.py}
if [[ $parts == *tests* ]]; then
  # the GPU set and the equivalence tests, which run on the GPU whenever there is one; the Chinese
  # quickstart test needs lm-eval, which the image lacks (test_gpu runs the quickstart without it)
  run tests 170 python3 -m pytest -q -n 8 -p no:cacheprovider -rfEP --timeout 110 $tests -k "not quickstart_chinese"
fi
if [[ $parts == *decode* ]]; then
  run decode 110 python3 bench/decode_speed.py --presets gpt2 --rounds 1 --repeats 2 --worker-timeout 45 \
    ${DECODE_PATHS:+--paths "$DECODE_PATHS"} --out "$out/decode_speed.json"
fi
if [[ $parts == *serve* ]]; then
  run serve 50 python3 bench/serve_load.py --duration 15 --out "$out/serve_load.json"
fi
if [[ $parts == *pretrain* ]]; then
  run pretrain 240 python3 bench/pretrain_throughput.py --shape gpt2 --rounds 1 --steps 20 --warmup 5 \
    --corpus-mb 6 ${nanogpt:+--nanogpt "$nanogpt"} --json "$out/pretrain_gpt2.json"
fi
if [[ $parts == *profile* ]]; then
  run profile 75 python3 bench/gpu_profile.py
fi
