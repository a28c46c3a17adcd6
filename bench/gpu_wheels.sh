#!/usr/bin/env bash
# The wheels bench/gpu_run.sh needs on the lent GPU machine and that its image lacks (it has torch,
# torchvision, numpy, pillow, pyarrow, matplotlib, prometheus-client, click, tqdm, regex, ...; not
# the serving stack, open_clip, the embedded store's engines or nvImageCodec), for its Python 3.12
# on x86_64 Linux, into .whl/ (git-ignored). Together under the device tool's 64 MiB limit on what
# travels (about 56 MB). Then, with the device tool (nothing else to install there):
#
#   bench/gpu_wheels.sh
#   run  carry: [".whl"]  command: python3 -m pip install -q --no-index --no-deps --no-compile \
#        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
#        CLIP_SIDECAR_CACHE=/tmp/cache bash bench/gpu_run.sh $OUT/figs 2>&1
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(
  flask==3.1.3 werkzeug==3.1.9 itsdangerous==2.2.0 blinker==1.9.0 gunicorn==27.0.1 orjson==3.13.0  # serving
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4                                  # the model
  faiss-cpu==1.15.1 tantivy==0.27.0                                                   # the embedded store
  opensearch-py==3.2.0 events==0.5 opensearch-protobufs==1.2.0 concurrent-log-handler==0.9.31
  nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43                          # --jpeg-decoder nvimagecodec
)
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$platform")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${wheels[@]}"
du -sh .whl
