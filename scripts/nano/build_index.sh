#!/usr/bin/env bash
# Build the attribution index that ships with the embedded stablecode-nano model: every file of its
# training corpus (work/nano/corpus from scripts/nano/data.sh) except the held-out validation files.
# Run it after the model is saved: save_checkpoint replaces the model directory as a whole.
# Usage: scripts/nano/build_index.sh [CORPUS_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
CORPUS="${1:-work/nano/corpus}"
OUT="${2:-stablecode/models/stablecode-nano/attribution-index}"
HELD_OUT=work/nano/packed/validation_files.tsv

if [ ! -d "$CORPUS" ]; then
    echo "no corpus at $CORPUS: run scripts/nano/data.sh first" >&2
    exit 1
fi
exclude=()
if [ -f "$HELD_OUT" ]; then
    exclude=(--exclude "$HELD_OUT")  # the model never trained on these: they are not its training data
else
    echo "warning: $HELD_OUT not found; indexing every corpus file, held-out ones included" >&2
fi
stablecode index build --data "$CORPUS" --out "$OUT" --window 50 --stride 32 --workers 2 \
    --license PSF-2.0 "${exclude[@]}"
