#!/usr/bin/env bash
# GPU verification of the cupy and triton backends, from a fresh CUDA machine:
#   bash benchmarks/gpu_check.sh            (from the repository root; PYTHON=... to pick the interpreter)
# Prints versions, installs only what is missing (a preinstalled torch or cupy is kept: a second
# cupy wheel for another CUDA would break the first), runs the cupy tests, the checks of
# benchmarks/gpu_check.py (one PASS/FAIL line each) and the forward-time table. Exit status 1
# when a test or a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

echo "== versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi not found"
"$PY" - <<'PYEOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "cupy", "triton", "numpy", "h5py"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "does not import:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
import torch
print("torch CUDA", torch.version.cuda, "| available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
PYEOF

echo "== install"
if "$PY" -c "import torch, transformers, numpy, h5py, rich, typer, safetensors, xxhash, pytest" 2>/dev/null; then
  echo "dependencies present: running from the checkout"
else
  extras=test
  "$PY" -c "import cupy" 2>/dev/null || extras=test,cupy
  "$PY" -m pip install -e ".[$extras]" || exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

status=0
echo "== tests (cupy backend)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cupy_backend.py || status=1
echo "== checks"
"$PY" -m benchmarks.gpu_check || status=1
echo "== forward time"
"$PY" -m benchmarks.backends_gpu || status=1
exit $status
