#!/usr/bin/env bash
# The stablecode-nano training run, in the background at the lowest priority, resumable across
# sessions: started again, the same command continues from ~/.cache/stablecode/runs/$RUN when its
# checkpoints are there, and otherwise starts from the shipped model's weights when that model was
# trained with the same tokenizer (else from scratch, saying so). Its process group id goes to
# ~/.cache/stablecode/train.pid, so /work/timing.sh can pause it (SIGSTOP/SIGCONT) and `kill -- -PGID`
# stops it. Usage: scripts/nano/train.sh [--foreground] [extra stablecode train options]
set -euo pipefail
cd "$(dirname "$0")/../.."
CORPUS="${STABLECODE_CORPUS:-$HOME/.cache/stablecode/corpus}"
RUN="${RUN:-nano-main}"
OUT="$HOME/.cache/stablecode/runs/$RUN"
SHIPPED=stablecode/models/stablecode-nano
PIDFILE="$HOME/.cache/stablecode/train.pid"
mkdir -p "$OUT"
FOREGROUND=0
if [ "${1:-}" = "--foreground" ]; then FOREGROUND=1; shift; fi

INIT=()
if ls "$OUT"/checkpoints/step-* >/dev/null 2>&1; then
    echo "resuming $OUT" >&2
elif cmp -s "$SHIPPED/tokenizer.json" "$CORPUS/packed/tokenizer.json"; then
    echo "no checkpoint in $OUT: starting from the weights of $SHIPPED" >&2
    INIT=(--init-from "$SHIPPED")
else
    echo "no checkpoint in $OUT and $SHIPPED uses another tokenizer: starting from scratch" >&2
fi
COMMAND=(python -m stablecode.train --config "${CONFIG:-configs/nano.json}" --data "$CORPUS/packed" --out "$OUT"
         "${INIT[@]}" --no-progress "$@")
if [ "$FOREGROUND" = 1 ]; then
    exec "${COMMAND[@]}"
fi
# setsid: its own process group (pid = pgid), so pausing it pauses every thread and child with it.
setsid nice -n 19 "${COMMAND[@]}" >>"$OUT/train.log" 2>&1 < /dev/null &
echo $! > "$PIDFILE"
echo "training in the background: process group $(cat "$PIDFILE") (in $PIDFILE), log $OUT/train.log" >&2
