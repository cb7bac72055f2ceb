#!/usr/bin/env bash
# llama.cpp beside our engine at the 3B shape, back to back on the same machine.
#
# llama.cpp is built outside the repository (default /tmp/llamacpp) from the source vendored in
# llama-cpp-python's sdist (PyPI is reachable here; GitHub is not), with llama-server beside
# llama-bench. The bench checkpoint (BENCH_DIR/bf16, made by scripts/bench/cpu.py) is converted with
# its convert_hf_to_gguf.py and quantized to q8_0 and q4_0. Then scripts/bench/cpu.py runs every
# engine, llama.cpp's through llama-bench (prefill at each length, decode after 512 tokens of
# context), into one table.
# Usage: scripts/bench/llamacpp.sh [LLAMACPP_DIR [BENCH_DIR [cpu.py options...]]]
#        (needs cmake and a C++ compiler; ~10 min to build on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK="${1:-/tmp/llamacpp}"
BENCH="${2:-work/bench}"
shift $(( $# > 2 ? 2 : $# ))
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
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DCMAKE_BUILD_TYPE=Release
  cmake --build "$WORK/src/build" --target llama-bench llama-quantize llama-server -j"$(nproc)"
fi
[ -f "$BENCH/bf16/config.json" ] || python scripts/bench/cpu.py --work "$BENCH" --engines "" --skip prefix,speculative
[ -f "$WORK/model-bf16.gguf" ] || PYTHONPATH="$WORK/src/gguf-py" python "$WORK/src/convert_hf_to_gguf.py" \
    "$BENCH/bf16" --outfile "$WORK/model-bf16.gguf" --outtype bf16
for q in q8_0 q4_0; do
  [ -f "$WORK/model-$q.gguf" ] || "$BIN/llama-quantize" "$WORK/model-bf16.gguf" "$WORK/model-$q.gguf" "$q" 2
done
python scripts/bench/cpu.py --work "$BENCH" --llamacpp "$WORK" --skip prefix,speculative "$@"
