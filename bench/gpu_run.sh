#!/usr/bin/env bash
# The GPU figures for bench/RESULTS.md, in one run on one GPU (the default steps took 7.3 minutes on an H200 on
# 2026-12-04; their time limits, each step's ceiling, add up to 9.2):
# CUDA-graph equivalence tests, the text tower eager vs graphed, serving texts (ViT-B-32, random
# weights, 8 workers or SERVE_WORKERS; the floor variant beside batched and pinned workers, so CPU per request
# outside the forward is compared with the floor in the same run; SERVE_VARIANTS adds unbatched
# and no-graphs, the eager text tower), serving images (base64 JPEGs decoded on the request threads,
# batched forward) and offline files→vectors (ViT-B-32 and ViT-L-14, bf16 autocast, the job's
# thumbnails: CPU decode workers vs the device's JPEG decoders — torchvision's nvjpeg and NVIDIA's
# nvImageCodec, alone and in the job — and for ViT-B-32 both at once, split; each against the
# model-only rate and the decode pool's own rate). nvImageCodec comes from the `nvimagecodec` extra:
# without it those runs fail with the install command and the others stand.
# Each step has its own time limit, so one failure still leaves the others' figures. Logs go to
# OUT; the device, driver, torch and Python versions head the summary.
#
#   bench/gpu_run.sh [OUT]                      # from the repository root, torch + CUDA installed
#   (on the device tool's machine: bench/gpu_wheels.sh fetches what it lacks, and says how to run this)
#   STEPS=embed_profile bench/gpu_run.sh OUT    # opt-in, py-spy installed: which threads of the
#       device-decode embed hold the GIL (OUT/embed_profile.raw, collapsed stacks per thread)
#   STEPS="tests serve" SERVE_VARIANTS=batched,unbatched bench/gpu_run.sh OUT   # a subset
#   STEPS=serve SERVE_WORKERS=14 bench/gpu_run.sh OUT   # more worker processes on the one GPU (default 8):
#       each is bound by its own GIL, so the HTTP rate may grow with them while the GPU idles
set -uo pipefail
out=${1:-/tmp/gpu-figures}
mkdir -p "$out"
# CLIP_SIDECAR_CACHE may point outside OUT (the device tool brings back only a few files from OUT)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CLIP_SIDECAR_CACHE="${CLIP_SIDECAR_CACHE:-$out/cache}"
export TQDM_MININTERVAL=5  # progress bars: a line every 5 s, not a screenful per second
py=${PYTHON:-python3}
steps=${STEPS:-tests text_tower serve serve_images embed_b32 embed_l14}
variants=${SERVE_VARIANTS:-floor,batched,pinned}
serve_workers=${SERVE_WORKERS:-8}
decoders=$(( $(nproc) - 2 ))

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  [[ " $steps " == *" $name "* ]] || return 0
  echo "=== $name: $*"
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  echo "=== $name: exit $?"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$py -c "import torch, open_clip, platform; print('torch', torch.__version__, 'open_clip', open_clip.__version__,
  'python', platform.python_version())" | tee -a "$out/device.txt"
step tests 50 $py -m pytest -q -p no:cacheprovider -W default tests/gpu
step text_tower 60 $py bench/text_tower.py --model ViT-B-32 --sizes 1,8,64,256,1024 --seconds 0.7
step serve 175 $py bench/serve_load.py --model ViT-B-32 --requests 3000 --concurrency 1,16,64 \
  --workers "$serve_workers" --client-processes 6 --threads 32 --variants "$variants"
step serve_images 75 $py bench/serve_load.py --model ViT-B-32 --modality image --image-side 256 \
  --requests 2000 --concurrency 16,64 --workers "$serve_workers" --client-processes 6 --threads 32 --variants batched
step embed_b32 120 $py bench/embed_throughput.py --model ViT-B-32 --images 30000 --image-side 320 \
  --batch-size 1024 --workers "$decoders" --decode cpu,device,split --jpeg-decoder torchvision,nvimagecodec \
  --thumbnail-size 128
step embed_profile 60 py-spy record --gil --threads --nonblocking --format raw -o "$out/embed_profile.raw" -- \
  $py bench/embed_throughput.py --model ViT-B-32 --images 20000 --image-side 320 --batch-size 1024 \
  --workers "$decoders" --decode device
step embed_l14 70 $py bench/embed_throughput.py --model ViT-L-14 --images 12000 --image-side 320 \
  --batch-size 256 --workers "$decoders" --decode cpu,device --jpeg-decoder torchvision,nvimagecodec

echo; echo "##### summary"; cat "$out/device.txt"
for name in $steps; do
  echo "--- $name"
  case $name in
    tests) tail -n 2 "$out/tests.txt" ;;
    text_tower) tail -n 14 "$out/text_tower.txt" ;;
    serve*) grep -E "^(model|floor|batched|unbatched|no-graphs|pinned| +[0-9]+ +[0-9]+ | +concurrency)" "$out/$name.txt" ;;
    embed*) grep -E "^(device|folder listing|decode only|decode pool only|worker pool start|device decode only|model only|end to end|  seconds by stage|split decode)" "$out/$name.txt" ;;
  esac
done
