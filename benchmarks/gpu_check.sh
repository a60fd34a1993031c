#!/usr/bin/env bash
# The one GPU check: TensorRT and ONNX Runtime's GPU providers against ONNX Runtime on the CPU
# (fp32: same tokens, logits within 1e-3; fp16: 90% of tokens, logits within 0.1), then the quick
# GPU benchmark; prints a table at the end. Installs nothing: a path whose package (tensorrt,
# cuda-python, onnxruntime-gpu) or GPU is missing is listed as skipped, with the reason.
#
#   bash benchmarks/gpu_check.sh [--model smollm2-135m-instruct|tiny] [--no-bench]
#
# Results go to $OUT (default /tmp/prefixport-gpu-check): gpu_check.json, gpu_check.md, bench-*/.
# Runs from a checkout without installing it (`python -m benchmarks.gpu_check` from the root imports
# prefixport from there; PYTHONPATH for any child process); uses .venv/bin/python when there is one.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export OUT=${OUT:-/tmp/prefixport-gpu-check}
mkdir -p "$OUT"
echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi: no NVIDIA driver here"
"$PY" - <<'PY'
import importlib.metadata as md
for name in ("onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12", "tensorrt-cu13", "cuda-bindings",
             "cuda-python", "torch", "transformers", "peft", "onnx"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
echo "== check"
# 470 s: the whole script stays under 8 minutes, setup included.
timeout 470 "$PY" -m benchmarks.gpu_check "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
