#!/usr/bin/env bash
# Download (here, where pip reaches an index) the wheels bench/gpu_run.sh installs on the GPU machine, whose
# image (Python 3.12, x86-64; checked 2026-11) has torch, an older transformers, tokenizers, accelerate, peft,
# pandas, tensorboard, matplotlib, pytest(-xdist, -timeout) but not these. No dependencies resolved: the list
# is complete for that image. pyarrow is trimmed (Flight, S3, headers and tests removed: unused by datasets
# here) so that everything travels within the device call's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
for pkg in transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 pyarrow==26.0.1 \
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    annotated-doc==0.0.7 typing-inspection==0.4.5 opentelemetry-api==1.45.2 uvicorn==0.54.0 \
    chatterbot-corpus==1.3.3 zstandard==0.25.0 torchao==0.18.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg"
done
wheel=$(ls .whl/pyarrow-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD/$wheel" && rm -rf pyarrow/include pyarrow/tests pyarrow/src pyarrow/*flight* \
  pyarrow/libarrow_s3* pyarrow/_s3fs* pyarrow/_pyarrow_cpp_tests* pyarrow/*gandiva* \
  && find pyarrow \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.h' \) -delete \
  && rm "$OLDPWD/$wheel" && zip -q -r -9 "$OLDPWD/$wheel" pyarrow pyarrow-*.dist-info)
rm -rf "$tmp"
du -sh .whl
