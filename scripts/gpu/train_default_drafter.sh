#!/usr/bin/env bash
# On the GPU machine, second call (carry .gpu-b, within 30 s of stage.sh): join the GGUF, train
# the default drafter and bring back the checkpoint, its history and loss plot, and the data.
# Knobs (environment): PROMPTS (3000), MINUTES of training (5), LAYERS (2), DEVICE (cuda),
# OUT (set by the device tool), WORK (/tmp/work).
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD CADDTREE_CACHE=/tmp/cc
work=${WORK:-/tmp/work}
gguf=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
    cat /tmp/m/gguf.part.aa .gpu-b/gguf.part.ab > "$gguf"
fi
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c -
start=$(date +%s)
# stopped short of the device tool's 10-minute limit, so that a checkpoint always comes back
timeout "${TIME_LIMIT:-560}" python3 -m caddtree train-drafter --target "$gguf" --device "${DEVICE:-cuda}" --out "$work" \
    --prompts .gpu-b/prompts.jsonl --num-prompts "${PROMPTS:-3000}" --eval-prompts 8 \
    --max-new-tokens 256 --generation-batch "${GENERATION_BATCH:-256}" \
    --layers "${LAYERS:-2}" --steps 1000000 --max-minutes "${MINUTES:-5}" \
    --anchors 32 --sequences-per-step "${SEQUENCES:-32}" --eval-every "${EVAL_EVERY:-1000}" \
    --mask-token-id 16 --save-dtype bfloat16 || echo "train-drafter ended with status $?"
echo "wall seconds: $(( $(date +%s) - start ))"
mkdir -p "$OUT/drafter"
gzip -c "$work/data.jsonl" > "$OUT/data.jsonl.gz"
cp "$work"/config.json "$work"/model.safetensors "$work"/history.json "$work"/loss.png "$OUT/drafter/"
ls -la "$OUT" "$OUT/drafter"
