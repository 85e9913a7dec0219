#!/usr/bin/env bash
# One prepared GPU session: the GPU tests (tests/ops/test_triton.py's Triton sweep and
# model parity among them), then the layer and model benchmarks.
# Run on a CUDA machine; results go to $OUT (or benchmarks/results). Exits non-zero when
# the project's venv is missing, when a step fails, or (after the benchmarks) when a GPU
# test failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [[ ! -x "$PY" ]]; then
    echo "gpu_check: $PWD/$PY is missing: create the venv first (make install)" >&2
    exit 2
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
nvidia-smi -L
"$PY" -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__,
'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
tests=0
"$PY" -m pytest -q -p no:cacheprovider -rfEs -m gpu tests 2>&1 | tail -40 || tests=$?
name=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
"$PY" benchmarks/bench_layer.py --device cuda --min-time 0.3 --out "$OUT"  # $OUT/gpu_<name>_layer.*
"$PY" benchmarks/bench_models.py --device cuda --batch 32 --min-time 0.5 --out "$OUT/models_${name}"
if [[ $tests -ne 0 ]]; then
    echo "gpu_check: the GPU tests FAILED (pytest exit $tests)" >&2
    exit "$tests"
fi
