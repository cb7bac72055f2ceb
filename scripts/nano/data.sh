#!/usr/bin/env bash
# Rebuild the training data of the embedded stablecode-nano model from CPython's standard library
# (PSF-2.0): corpus in the starcoderdata layout, an 8192-token tokenizer, 1024-token packed sequences.
# Everything goes under work/nano/ (git-ignored). Usage: scripts/nano/data.sh [PYTHON_LIB_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
LIB="${1:-/root/.pyenv/versions/3.11.7/lib/python3.11}"
OUT=work/nano

# site-packages holds third-party code under other licences; __pycache__ holds bytecode.
stablecode data from-dir "$LIB" --out "$OUT/corpus" --license PSF-2.0 --repo-name cpython-3.11.7-Lib \
    --exclude site-packages --exclude __pycache__ --overwrite
# Trained on the training split only: the files `pack` holds out at 0.02 are never read.
stablecode tokenizer train --data "$OUT/corpus" --vocab-size 8192 --validation-fraction 0.02 \
    --out "$OUT/tokenizer.json"
rm -rf "$OUT/packed"  # a pack directory only resumes runs with the same corpus and tokenizer
stablecode data pack --data "$OUT/corpus" --tokenizer "$OUT/tokenizer.json" --seq-len 1024 \
    --validation-fraction 0.02 --workers 2 --out "$OUT/packed"
