#!/usr/bin/env bash
# One prepared GPU session: the GPU tests, then the layer and model benchmarks.
# Run from the repository root on a CUDA machine; results go to $OUT (or benchmarks/results).
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -5
name=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
python3 benchmarks/bench_layer.py --device cuda --min-time 0.3 --out "$OUT"  # $OUT/gpu_<name>_layer.*
python3 benchmarks/bench_models.py --device cuda --batch 32 --min-time 0.5 --out "$OUT/models_${name}"
