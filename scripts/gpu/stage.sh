#!/usr/bin/env bash
# On the GPU machine, first call (carry .gpu-a): park the GGUF's first half and install the wheels.
set -euo pipefail
mkdir -p /tmp/m
cp .gpu-a/gguf.part.aa /tmp/m/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-a/whl/*.whl
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
ls -la /tmp/m
