#!/usr/bin/env bash
# Download (here, where pip reaches an index) the wheels bench/gpu_run.sh needs on the GPU machine, whose
# image has torch, transformers, tokenizers, tiktoken, peft and pandas but not these (pyarrow and fsspec: the
# versions datasets needs). Python
# 3.12, x86-64, no dependencies resolved: the list below is complete for that image (checked 2026-11).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
for pkg in datasets dill multiprocess fsspec==2026.9.0 pyarrow chatterbot-corpus zstandard; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg"
done
du -sh .whl
