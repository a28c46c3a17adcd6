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
#
#   bench/gpu_wheels.sh --check   # only check that every dependency in pyproject.toml is fetched here,
#                                 # in the image or not needed (run by tests/unit/test_gpu_wheels.py)
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(
  flask==3.1.3 werkzeug==3.1.9 itsdangerous==2.2.0 blinker==1.9.0 gunicorn==27.0.1 orjson==3.13.0  # serving
  setproctitle==1.3.8                                                                 # thread names
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4                                  # the model
  faiss-cpu==1.15.1 tantivy==0.27.0                                                   # the embedded store
  opensearch-py==3.2.0 events==0.5 opensearch-protobufs==1.2.0 concurrent-log-handler==0.9.31
  nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43                          # --jpeg-decoder nvimagecodec
)
# In the lent machine's image already (its pip list on 2026-11-30).
in_image=(torch torchvision numpy pillow pyarrow matplotlib prometheus-client click tqdm regex)
# Imported by none of gpu_run.sh's steps (only by `clip-sidecar eval`).
not_needed=(ir-measures)

# A dependency added to pyproject.toml and forgotten here fails every step on the GPU machine at
# import (setproctitle did, for a day): refuse before fetching anything.
python3 - "${PYPROJECT:-pyproject.toml}" "${wheels[@]}" -- "${in_image[@]}" "${not_needed[@]}" <<'PY'
import re, sys, tomllib

def name(requirement: str) -> str:  # PEP 503's normal form
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()).lower()

pyproject, rest = sys.argv[1], sys.argv[2:]
cut = rest.index("--")
covered = {name(w) for w in rest[:cut]} | {name(n) for n in rest[cut + 1:]}
with open(pyproject, "rb") as f:
    wanted = [name(d) for d in tomllib.load(f)["project"]["dependencies"]]
missing = [d for d in wanted if d not in covered]
if missing:
    sys.exit(f"bench/gpu_wheels.sh: {', '.join(missing)} (a dependency in {pyproject}) is neither fetched "
             "here, in the image (in_image) nor marked not needed (not_needed): add it to one of them")
PY
[[ ${1:-} == --check ]] && exit 0

platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$platform")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${wheels[@]}"
du -sh .whl
