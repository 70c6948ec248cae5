#!/usr/bin/env bash
# The GPU checks in one go (run on a CUDA machine from the repository root):
#   bash benchmarks/gpu.sh            # results land in benchmarks/results/ (and in $OUT if set)
# CUDA mask and torch.compile tests, step-time overhead of CS vs dense on resnet20 (CIFAR-shaped
# batches) and resnet50 (ImageNet-shaped synthetic batches), fp32 and bf16 autocast + channels-last,
# eager and torch.compile, and CLI smoke runs (eager and compiled). Everything also goes into $OUT/gpu_results.tgz.
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/contsparse-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -m pytest -q tests/test_masking.py -k "cuda or compile" 2>&1 | tail -3
$PY benchmarks/overhead.py --device cuda --models resnet20 --batch-size 128 --blocks 10 --name overhead_cuda_resnet20
$PY benchmarks/overhead.py --device cuda --models resnet20 --batch-size 128 --blocks 10 --amp --channels-last \
    --name overhead_cuda_resnet20_amp
$PY benchmarks/overhead.py --device cuda --models resnet50 --batch-size 64 --blocks 8 --name overhead_cuda_resnet50
$PY benchmarks/overhead.py --device cuda --models resnet50 --batch-size 64 --blocks 8 --amp --channels-last \
    --name overhead_cuda_resnet50_amp
$PY benchmarks/overhead.py --device cuda --models resnet20 --batch-size 128 --blocks 8 --compile \
    --name overhead_cuda_resnet20_compiled
$PY benchmarks/overhead.py --device cuda --models resnet50 --batch-size 64 --blocks 6 --compile --amp --channels-last \
    --name overhead_cuda_resnet50_amp_compiled
# The CLI end to end on the GPU: the ResNet-20 ticket preset, one short epoch per phase, synthetic data.
/usr/bin/time -f "cli wall %e s" $PY -m contsparse ticket --preset cifar10-resnet20-ticket --dataset synthetic \
    --synthetic-size 2048 --epochs 1 --device cuda --amp --channels-last --out /tmp/gpu-run 2>&1 | tail -4
cp /tmp/gpu-run/summary.json benchmarks/results/gpu_cli_summary.json 2>/dev/null || echo "no summary"
# The same with torch.compile (most of its wall time is compiling).
/usr/bin/time -f "cli wall %e s" $PY -m contsparse ticket --preset cifar10-resnet20-ticket --dataset synthetic \
    --synthetic-size 2048 --epochs 1 --device cuda --compile --out /tmp/gpu-compile 2>&1 | tail -4
cp /tmp/gpu-compile/summary.json benchmarks/results/gpu_cli_compile_summary.json 2>/dev/null || echo "no summary"
tar czf "$OUT"/gpu_results.tgz benchmarks/results/overhead_cuda_resnet* benchmarks/results/gpu_cli_*summary.json
