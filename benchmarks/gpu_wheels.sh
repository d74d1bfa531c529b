#!/usr/bin/env bash
# Download, here (a registry is reachable), the wheels the GPU check needs on the bare GPU machine (Python 3.12,
# torch and torchvision, numpy, scipy, pillow, tqdm, pyyaml, pandas, matplotlib preinstalled; no registry) into
# .gpu-wheels/ (git-ignored; carried with the working tree). Not torch: the machine's own build stays. Versions
# are those cmbench is tested with (the dev venv); --no-deps, so every dependency is listed here.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu-wheels
python -m pip download --quiet --dest .gpu-wheels --no-deps --only-binary=:all: --implementation cp \
  --python-version 3.12 --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-extensions==4.16.0 typing-inspection==0.4.5 \
  torch-fidelity==0.4.0 clean-fid==0.1.35 requests==2.34.2 urllib3==2.8.0 idna==3.20 charset-normalizer==3.5.3 \
  certifi==2026.10.19.post1 scikit-learn==1.9.1 joblib==1.6.0 threadpoolctl==3.8.0 narwhals==2.29.0 \
  cloudpickle==3.1.3
du -sh .gpu-wheels
