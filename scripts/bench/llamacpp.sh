#!/usr/bin/env bash
# llama.cpp beside our engine at the 3B shape, back to back on the same machine.
#
# llama.cpp is built from the source vendored in llama-cpp-python's sdist (PyPI is reachable here;
# GitHub is not), the bench checkpoint (work/bench/bf16, from scripts/bench/cpu.py) is converted
# with its convert_hf_to_gguf.py and quantized to q8_0 and q4_0; llama-bench then measures a
# 512-token prefill and 64 tokens decoded after 512 tokens of context (-d 512), as our benchmark does.
# Usage: scripts/bench/llamacpp.sh [WORK_DIR]   (needs cmake and a C++ compiler; ~10 min to build)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK="${1:-work/llamacpp}"
mkdir -p "$WORK"
if [ ! -d "$WORK/src" ]; then
  pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d "$WORK"
  mkdir -p "$WORK/src" && tar xzf "$WORK"/llama_cpp_python-0.3.36.tar.gz -C "$WORK/src" --strip-components=3 \
      llama_cpp_python-0.3.36/vendor/llama.cpp
  # Its GPT-NeoX converter reads `rotary_pct`, which transformers 5 folds into `rope_parameters`.
  sed -i 's/int(self.hparams\["rotary_pct"\] \*/int(self.hparams.get("rotary_pct", (self.hparams.get("rope_parameters") or {}).get("partial_rotary_factor", 0.25)) */' \
      "$WORK/src/conversion/gptneox.py"
fi
BIN="$WORK/src/build/bin"
if [ ! -x "$BIN/llama-bench" ]; then
  cmake -S "$WORK/src" -B "$WORK/src/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release
  cmake --build "$WORK/src/build" --target llama-bench llama-quantize -j"$(nproc)"
fi
[ -f "$WORK/model-bf16.gguf" ] || PYTHONPATH="$WORK/src/gguf-py" python "$WORK/src/convert_hf_to_gguf.py" \
    work/bench/bf16 --outfile "$WORK/model-bf16.gguf" --outtype bf16
for q in q8_0 q4_0; do
  [ -f "$WORK/model-$q.gguf" ] || "$BIN/llama-quantize" "$WORK/model-bf16.gguf" "$WORK/model-$q.gguf" "$q" 2
done
for m in q8_0 q4_0 bf16; do
  echo "== llama.cpp $m"
  "$BIN/llama-bench" -m "$WORK/model-$m.gguf" -t 2 -r 3 -p 512 -n 0 -o md 2>/dev/null
  "$BIN/llama-bench" -m "$WORK/model-$m.gguf" -t 2 -r 3 -p 0 -n 64 -d 512 -o md 2>/dev/null
done
python scripts/bench/cpu.py --work work/bench --repeats 3 --skip prefix,speculative --engines ours-int8,ours-int4,ours-bf16
