"""scripts/bench/attention.py: both attention routes compute the same prompt attention as fp32
math, for a whole prompt and for an engine chunk at an offset, and each case says which route the
engine takes on this CPU."""

from stablecode import kernels
from stablecode.kernels import ops

def test_whole_prompts_and_chunks_match_fp32_math_on_every_route(bench_script):
    bench = bench_script("attention")
    kernels.load()
    for queries, keys in [(48, 48), (32, 96)]:
        row = bench.case(queries, keys, heads=2, head_dim=32, min_time=0.0)
        assert row["sdpa_error"] < 3e-2
        if "kernel_ms" in row:  # the kernel is built and the CPU has AVX512-BF16
            assert row["kernel_error"] < 3e-2
        library = kernels.loaded()
        assert ("kernel_ms" in row) == (library is not None and library.bf16_attention_available())
        assert row["engine_uses"] == ("kernel" if "kernel_ms" in row and not ops.sdpa_on_tiles() else "SDPA")
