#!/usr/bin/env bash
# The stablecode-nano corpus from an empty machine: wheels of the pinned packages of
# configs/nano/train-packages.txt and heldout-packages.txt (pip), licence check, .py files, exact and
# near (MinHash) deduplication against the held-out set and across packages, CPython's standard
# library, then the starcoderdata layout. Everything lives under $STABLECODE_CORPUS
# (default ~/.cache/stablecode/corpus), outside the work tree.
# Usage: scripts/nano/corpus.sh [PYTHON_LIB_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
LIB="${1:-$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}"
PYVER="$(python3 -c 'import platform; print(platform.python_version())')"
CORPUS="${STABLECODE_CORPUS:-$HOME/.cache/stablecode/corpus}"
mkdir -p "$CORPUS"

stablecode data pypi --train-packages configs/nano/train-packages.txt \
    --heldout-packages configs/nano/heldout-packages.txt --wheels "$CORPUS/wheels" --out "$CORPUS/tree" \
    --stdlib "$LIB" --stdlib-version "$PYVER" ${NO_DOWNLOAD:+--no-download}
for split in train heldout; do
    stablecode data from-dir "$CORPUS/tree/$split" --out "$CORPUS/starcoder-$split" --languages python \
        --packages "$CORPUS/tree/packages-$split.json" --overwrite
done
# The tokenizer: StarCoder's special tokens (FIM sentinels at ids 1-4), 8192 ids (docs/training.md
# has the measured vocabulary sweep), trained on a fixed tenth of the training files.
stablecode tokenizer train --data "$CORPUS/starcoder-train" --languages python=0.1 --vocab-size 8192 \
    --validation-fraction 0.01 --out "$CORPUS/tokenizer.json"
# 512-token sequences, half of the training files rearranged for fill-in-the-middle.
stablecode data pack --data "$CORPUS/starcoder-train" --tokenizer "$CORPUS/tokenizer.json" --seq-len 512 \
    --validation-fraction 0.01 --workers 2 --languages python --fim-rate 0.5 --out "$CORPUS/packed"
