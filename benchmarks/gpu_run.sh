#!/usr/bin/env bash
# The GPU check on a bare GPU machine, from the repository root: install the carried wheels (benchmarks/gpu_wheels.sh
# made them; no registry is needed), then run every section (≤ 8 minutes on one H200). Arguments go to
# `python -m benchmarks.gpu` (e.g. --out DIR, --peak-tflops X).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-index --find-links .gpu-wheels pydantic torch-fidelity clean-fid scikit-learn
python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}", flush=True)
PY
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python -m benchmarks.gpu "$@"
