#!/usr/bin/env bash
# On the GPU machine (after stage.sh; carry .gpu-b): the GPU-path report and the cost profiles.
# Knobs (environment): PROMPTS (8), TOKENS (128), DRAFTER (default: the shipped one), OUT (device tool).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD CADDTREE_CACHE=/tmp/cc
gguf=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || cat /tmp/m/gguf.part.aa .gpu-b/gguf.part.ab > "$gguf"
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c - || exit 1
drafter=${DRAFTER:+--drafter $DRAFTER}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
timeout 300 python3 benchmarks/gpu_report.py --device cuda --target "$gguf" $drafter \
    --prompts "${PROMPTS:-8}" --max-new-tokens "${TOKENS:-128}" --out "$OUT" || echo "gpu_report ended with $?"
timeout 90 python3 -m caddtree profile --device cuda --target "$gguf" $drafter --out "$OUT/cv-smollm2.json" \
    || echo "profile ended with $?"
for arch in qwen3-4b qwen3-8b; do
    timeout 90 python3 -m caddtree profile --device cuda --dtype bfloat16 --target "random:$arch" --drafter random:5 \
        --contexts 128,512,1536 --out "$OUT/cv-$arch.json" || echo "profile $arch ended with $?"
done
ls -la "$OUT"
