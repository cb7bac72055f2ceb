"""The KV cache: what it stores, and that a model reads the same keys and values back through it.

An int8 cache stores each key and value row quantized (`kernels.quantize_rows`); everything that
reads it (decode attention, prompt chunks, rows copied or stored and written back) sees those values."""

import pytest
import torch

from stablecode import GPTNeoX, ModelConfig, kernels
from stablecode.kernels import build, ops
from stablecode.kv_cache import KVCache
from stablecode.model import init_weights

CONFIG = ModelConfig(name="kv-test", vocab_size=300, hidden_size=128, num_layers=2, num_heads=4,
                     intermediate_size=256, max_position_embeddings=128)


def random_model(dtype=torch.float32, seed: int = 0) -> GPTNeoX:
    torch.manual_seed(seed)
    model = GPTNeoX(CONFIG)
    init_weights(model)
    return model.to(dtype).eval()


@pytest.fixture(params=["kernels", "pytorch"])
def kernels_or_not(request, monkeypatch):
    """Both ways the cache's reads run: the compiled kernels, and PyTorch alone (no compiler)."""
    if request.param == "kernels":
        if kernels.load() is None:
            pytest.fail("the CPU kernels did not build on this machine")
    else:
        monkeypatch.setattr(build, "loaded", lambda: None)
    return request.param


def test_an_int8_cache_holds_half_a_bf16_caches_bytes_plus_one_scale_per_row():
    model = random_model(torch.bfloat16)
    plain = KVCache.for_model(model, 2, 64)
    int8 = KVCache.for_model(model, 2, 64, kv_cache_dtype="int8")
    assert plain.dtype == int8.dtype == torch.bfloat16 and int8.k.dtype == torch.int8 and int8.quantized
    scales = 2 * CONFIG.num_layers * CONFIG.num_heads * 4
    assert int8.bytes_per_token == plain.bytes_per_token // 2 + scales == CONFIG.kv_cache_bytes_per_token(1)
    assert int8.nbytes == 2 * 64 * int8.bytes_per_token
    assert plain.layout() != int8.layout()  # a prefix stored from one means nothing to the other


def test_an_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown KV cache dtype 'fp8'.*auto, int8"):
        KVCache.for_model(random_model(), 1, 8, kv_cache_dtype="fp8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_through_an_int8_cache_stays_close_to_the_float_cache(kernels_or_not, dtype):
    model = random_model(dtype)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = {}
        for name in ("auto", "int8"):
            cache = KVCache.for_model(model, 1, 48, kv_cache_dtype=name)
            prompt = model(ids[:, :30], cache=cache, input_pos=0)
            chunk = model(ids[:, 30:34], cache=cache, input_pos=30)  # a prompt tail after a cached prefix
            steps = [model(ids[:, t:t + 1], cache=cache, input_pos=torch.tensor([[t]]), cache_rows=torch.tensor([0]))
                     for t in range(34, 40)]
            logits[name] = torch.cat([prompt, chunk, *steps], dim=1).float()
    error = (logits["int8"] - logits["auto"]).norm() / (logits["auto"] - logits["auto"].mean()).norm()
    assert 0 < error < 0.02
    assert (logits["int8"].argmax(-1) == logits["auto"].argmax(-1)).float().mean() >= 0.95


def test_the_decode_kernel_and_pytorch_read_an_int8_cache_alike(monkeypatch):
    if kernels.load() is None:
        pytest.fail("the CPU kernels did not build on this machine")
    model = random_model(torch.bfloat16)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    results, calls = {}, []
    decode = ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a: calls.append(a[1].dtype) or decode(*a))
    with torch.inference_mode():
        for name in ("kernels", "pytorch"):
            if name == "pytorch":
                monkeypatch.setattr(build, "loaded", lambda: None)
            cache = KVCache.for_model(model, 1, 32, kv_cache_dtype="int8")
            model(ids[:, :20], cache=cache, input_pos=0)
            results[name] = torch.cat([model(ids[:, t:t + 1], cache=cache, input_pos=torch.tensor([[t]]),
                                             cache_rows=torch.tensor([0])) for t in range(20, 24)], 1).float()
    assert calls and set(calls) == {torch.int8}  # the kernel read the int8 cache as it is
    spread = results["pytorch"].std()
    assert (results["kernels"] - results["pytorch"]).abs().max() < 0.05 * spread


def test_rows_copied_grown_read_and_written_back_keep_their_int8_values_and_scales():
    model = random_model(torch.bfloat16)
    cache = KVCache.for_model(model, 2, 16, kv_cache_dtype="int8")
    ids = torch.randint(0, CONFIG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        model(ids, cache=cache, input_pos=torch.arange(12)[None], cache_rows=torch.tensor([1]))
    assert cache.k_scale[:, 1, :, :12].min() > 0 and cache.k[:, 1, :, :12].abs().max() == 127
    stored = cache.read(1, 12)
    assert len(stored) == 4 and stored[2].shape == (CONFIG.num_layers, CONFIG.num_heads, 12)
    cache.copy_row(1, 0, 10)
    for buffer in cache.buffers:
        assert torch.equal(buffer[:, 0, :, :10], buffer[:, 1, :, :10])
    bigger = cache.grown(3, 32)
    assert bigger.quantized and bigger.k.shape[1] == 3 and bigger.k.shape[3] == 32
    bigger.write(2, stored, list(range(12)))
    for buffer, part in zip(bigger.buffers, stored):
        assert torch.equal(buffer[:, 2, :, :12], part) and torch.equal(buffer[:, 1, :, :12], part)
    assert bigger.tokens[2] == list(range(12))
