#!/usr/bin/env bash
# The attribution index that ships with stablecode-nano: the text its training run actually read
# (scripts/nano/seen_corpus.py reproduces the run's data order up to the exported checkpoint).
# Run it after scripts/nano/export.py: the export replaces the model directory as a whole.
# Usage: scripts/nano/build_index.sh [CHECKPOINT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
CORPUS="${STABLECODE_CORPUS:-$HOME/.cache/stablecode/corpus}"
MODEL=stablecode/models/stablecode-nano
CHECKPOINT="${1:-$HOME/.cache/stablecode/runs/nano-main/checkpoints/$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["checkpoint"])' "$MODEL/training_summary.json")}"
SEEN="$CORPUS/seen"
rm -rf "$SEEN"
python scripts/nano/seen_corpus.py --checkpoint "$CHECKPOINT" --corpus "$CORPUS" --out "$SEEN"
stablecode index build --data "$SEEN" --out "$MODEL/attribution-index" --window 50 --stride 32 --workers 2
