#!/usr/bin/env bash
# Every evaluation of issue 12 on a model (default: the embedded stablecode-nano), results in OUT:
# held-out bits/byte vs xz -9e and single-line FIM (eval_heldout.py), next-line completion on the
# held-out packages (stablecode eval lines), HumanEval pass@1 (T 0.2) and pass@10 (T 0.8), n = 20.
# Usage: scripts/nano/evaluate.sh [MODEL] [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${1:-stablecode/models/stablecode-nano}"
OUT="${2:-$HOME/.cache/stablecode/eval/nano}"
HELDOUT="${STABLECODE_CORPUS:-$HOME/.cache/stablecode/corpus}/tree/heldout"
mkdir -p "$OUT"
python scripts/nano/eval_heldout.py --model "$MODEL" --heldout "$HELDOUT" --fim-lines 500 --json "$OUT/heldout.json"
stablecode eval lines --model "$MODEL" --data "$HELDOUT" --num-lines 1000 --out "$OUT/lines"
stablecode eval humaneval --model "$MODEL" --n 20 --temperature 0.2 --top-p 0.95 --out "$OUT/humaneval-t0.2"
stablecode eval humaneval --model "$MODEL" --n 20 --temperature 0.8 --top-p 0.95 --out "$OUT/humaneval-t0.8"
