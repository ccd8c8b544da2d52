#!/usr/bin/env bash
# A CI step: prune MODEL with DATA on the Apoptosis service ($APOPTOSIS_URL, $APOPTOSIS_API_KEY),
# fail the build when the job fails or accuracy on the held-out quarter of DATA drops by more
# than MAX_DROP, and leave the pruned model in OUT.
#
#   TARGET=macs=0.5 MAX_DROP=0.02 examples/pipeline.sh model.zip data.safetensors pruned/
#   NOTIFY_URL=https://ci.example/hooks/apoptosis …   # also notify a webhook receiver
set -euo pipefail
MODEL_FILE=${1:?usage: pipeline.sh MODEL DATA [OUT]}
DATA_FILE=${2:?usage: pipeline.sh MODEL DATA [OUT]}
OUT=${3:-pruned}
TARGET=${TARGET:-macs=0.5}
MAX_DROP=${MAX_DROP:-0.02}

field() { python -c "import json, sys; print(json.load(sys.stdin)$1)"; }

model=$(apoptosis models upload "$MODEL_FILE" --json | field '["id"]')
data=$(apoptosis datasets upload "$DATA_FILE" --json | field '["id"]')
# --wait exits 1 with the job's error code when it fails: the build fails with it.
job=$(apoptosis jobs submit "$model" "$data" --target "$TARGET" --eval-fraction 0.25 \
      ${STEPS:+--steps "$STEPS"} ${NOTIFY_URL:+--notify-url "$NOTIFY_URL"} --wait --json | field '["id"]')

apoptosis jobs show "$job" --json | python -c "
import json, sys
result = json.load(sys.stdin)['result']
before, after = result['before']['accuracy'], result['after_pruning']['accuracy']
kept = result['macs_after'] / result['macs_before']
print(f'MACs kept {kept:.3f}; accuracy {before:.4f} -> {after:.4f}')
sys.exit(1 if before - after > $MAX_DROP else 0)
"
apoptosis jobs download "$job" --output "$OUT"
echo "$job"
