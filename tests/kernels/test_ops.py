"""The compiled kernels against reference math (the quantized formats of stablecode.quantize), and
`attention()`: the decode kernel where it applies, SDPA otherwise."""

import pytest
import torch
import torch.nn.functional as F

from stablecode import GPTNeoX, ModelConfig, kernels
from stablecode import quantize as Q
from stablecode.kernels import ops
from stablecode.kv_cache import KVCache
from stablecode import model as M

CONFIG = ModelConfig(name="kernel-test", vocab_size=320, hidden_size=128, num_layers=2, num_heads=4,
                     intermediate_size=512, max_position_embeddings=128)


@pytest.fixture(scope="module")
def ext():
    library = kernels.load()
    if library is None:
        pytest.fail("the CPU kernels did not build on this machine (see the warning above)")
    return library


def per_row(x: torch.Tensor) -> torch.Tensor:
    """x after the int8 kernels' quantization per row (last dim): scale max|x|/127, round half to even."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    # torch.div, not `127.0 / amax` (which is computed as amax.reciprocal() * 127 and rounds differently).
    inv = torch.where(amax > 0, torch.div(torch.full_like(amax, 127.0), amax), torch.zeros_like(amax))
    return torch.round(x * inv) * (amax / 127.0)


# ---- kernels against reference math ----------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 3, 4, 5, 7, 8, 9, 11, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_matches_reference(ext, rows, dtype):
    torch.manual_seed(rows)
    w, b, x = torch.randn(74, 256), torch.randn(74), torch.randn(rows, 256).to(dtype)
    q, scale = Q.quantize_int8(w)
    expected = per_row(x).double() @ Q.dequantize_int8(q, scale).double().T + b.to(dtype).double()
    y = ext.int8_linear(x, q, scale, Q.int8_row_sums(q), b.to(dtype))
    assert y.dtype == dtype and y.shape == (rows, 74)
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((y.double() - expected).abs() <= tolerance * (expected.abs() + 1)).all()
    # And the activation quantization itself costs little against exact float math.
    exact = x.double() @ Q.dequantize_int8(q, scale).double().T + b.to(dtype).double()
    assert (y.double() - exact).abs().max() <= 0.02 * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_and_int4_kernels_give_the_same_bits_on_avx2_and_vnni(ext, dtype):
    """The sums are exact integers, so the AVX2 loops (the Zen 1-3 path) and the VNNI ones agree bit
    for bit, at any number of rows (on an AVX2-only CPU both calls take the AVX2 loop)."""
    torch.manual_seed(3)
    w, b = torch.randn(134, 384), torch.randn(134).to(dtype)  # N not a multiple of the 4 weight rows a pass
    q, scale = Q.quantize_int8(w)
    sums = Q.int8_row_sums(q)
    for rows in (1, 2, 5, 6, 9, 10, 13, 16):  # VNNI: tiles of up to 5 activation rows, evenly filled
        x = torch.randn(rows, 384).to(dtype)
        assert torch.equal(ext.int8_linear(x, q, scale, sums, b, "avx2"), ext.int8_linear(x, q, scale, sums, b))
    with pytest.raises(RuntimeError, match="isa"):
        ext.int8_linear(x, q, scale, sums, b, "sse2")
    packed, s4, m4 = Q.quantize_int4(w, 64)
    for rows in (1, 3, 6):
        x = torch.randn(rows, 384).to(dtype)
        assert torch.equal(ext.int4_linear(x, packed, s4, m4, 64, b, "avx2"), ext.int4_linear(x, packed, s4, m4, 64, b))


# 6, 10 and 16 groups of 64: the 8-group steps and the rest; and widths that are no multiple of 128
# (one, three and five groups of 64: a hidden size of 64 or 192 once made the one-row loop write
# past its buffer).
@pytest.mark.parametrize("K, group_size", [(K, g) for K in (64, 192, 320, 384, 640, 1024) for g in (32, 64, 128)
                                           if K % g == 0])
def test_int4_rows_give_the_same_bits_alone_or_together_on_either_isa(ext, K, group_size):
    """A decode step (one row, its own loops) and the same row inside a batch agree bit for bit."""
    torch.manual_seed(K + group_size)
    w, b = torch.randn(67, K), torch.randn(67)
    packed, s4, m4 = Q.quantize_int4(w, group_size)
    x = torch.randn(5, K).bfloat16()
    for isa in ("avx2", ""):
        together = ext.int4_linear(x, packed, s4, m4, group_size, b, isa)
        for row in range(5):
            alone = ext.int4_linear(x[row:row + 1], packed, s4, m4, group_size, b, isa)
            assert torch.equal(alone, together[row:row + 1]), (isa, row)
    assert torch.equal(ext.int4_linear(x[:1], packed, s4, m4, group_size, b, "avx2"),
                       ext.int4_linear(x[:1], packed, s4, m4, group_size, b))


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_reference(ext, rows, group_size, dtype):
    torch.manual_seed(rows + group_size)
    w, b, x = torch.randn(40, 384), torch.randn(40), torch.randn(rows, 384).to(dtype)
    packed, scale, minimum = Q.quantize_int4(w, group_size)
    dequantized = Q.dequantize_int4(packed, scale, minimum, group_size).double()
    expected = per_row(x).double() @ dequantized.T + b.to(dtype).double()
    y = ext.int4_linear(x, packed, scale, minimum, group_size, b.to(dtype))
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((y.double() - expected).abs() <= tolerance * (expected.abs() + 1)).all()


def test_kernels_without_bias_and_with_zero_input(ext):
    w = torch.randn(16, 64)
    q, scale = Q.quantize_int8(w)
    x = torch.zeros(2, 64)
    x[1, :32] = torch.randn(32)  # an all-zero row and an all-zero block: scale 0 must not produce nan
    expected = per_row(x).double() @ Q.dequantize_int8(q, scale).double().T
    assert torch.allclose(ext.int8_linear(x, q, scale, Q.int8_row_sums(q), None).double(), expected, atol=1e-5)
    packed, s4, m4 = Q.quantize_int4(w, 32)
    expected = per_row(x).double() @ Q.dequantize_int4(packed, s4, m4, 32).double().T
    assert torch.allclose(ext.int4_linear(x, packed, s4, m4, 32, None).double(), expected, atol=1e-5)


def test_a_bf16_bias_gives_the_bits_of_its_fp32_copy(ext):
    """The kernels widen a bf16 bias themselves: the result is that of its fp32 copy."""
    torch.manual_seed(5)
    w, x = torch.randn(64, 128), torch.randn(3, 128).bfloat16()
    q, scale = Q.quantize_int8(w)
    packed, s4, m4 = Q.quantize_int4(w, 64)
    bias = torch.randn(64).bfloat16()
    sums = Q.int8_row_sums(q)
    for call in (lambda b: ext.int8_linear(x, q, scale, sums, b), lambda b: ext.int4_linear(x, packed, s4, m4, 64, b),
                 lambda b: ext.prompt_int8_linear(torch.randn(40, 128).bfloat16(), q, scale, b)
                 if ext.prompt_isa() else torch.zeros(1)):
        torch.manual_seed(6)
        expected = call(bias.float())
        torch.manual_seed(6)
        assert torch.equal(call(bias), expected)


def test_eager_calls_give_what_the_custom_ops_give(ext):
    """Eager calls go straight to the extension; the registered op (what torch.compile sees) agrees,
    and stands in where an input requires grad, which it refuses to differentiate."""
    torch.manual_seed(7)
    w, b, x = torch.randn(64, 128), torch.randn(64).bfloat16(), torch.randn(2, 128).bfloat16()
    packed, s4, m4 = Q.quantize_int4(w, 64)
    direct = ops.int4_linear(x, packed, s4, m4, 64, b)
    assert torch.equal(direct, torch.ops.stablecode.int4_linear(x, packed, s4, m4, 64, b))
    wanting_grad = x.float().requires_grad_()
    with pytest.raises(RuntimeError, match="(?i)autograd"):
        ops.int4_linear(wanting_grad, packed, s4, m4, 64, b).sum().backward()

def bf16_isas(ext):
    return ["avx2"] + (["avx512-bf16"] if ext.bf16_attention_available() else [])


@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("K", [200, 2560])  # 200: a tail past the 64-wide steps
def test_bf16_kernel_matches_fp32_math(ext, rows, K):
    torch.manual_seed(1)
    w, b, x = torch.randn(50, K).bfloat16(), torch.randn(50).bfloat16(), torch.randn(rows, K).bfloat16()
    expected = F.linear(x.double(), w.double(), b.double())
    for isa in bf16_isas(ext):
        y = ext.bf16_linear(x, w, b, isa)
        assert y.dtype == torch.bfloat16
        assert ((y.double() - expected).abs() <= 2 ** -8 * expected.abs() + 1e-3).all(), isa  # one bf16 rounding
    # fp32 activations are never rounded to bf16: they take the widening loop
    assert torch.allclose(ext.bf16_linear(x.float() + 1e-3, w, None).double(),
                          F.linear(x.double() + 1e-3, w.double()), atol=1e-4)


def test_the_bf16_dot_kernel_refuses_what_it_cannot_run(ext):
    w, x = torch.randn(8, 64).bfloat16(), torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="avx512-bf16 kernel needs"):
        ext.bf16_linear(x, w, None, "avx512-bf16")  # fp32 activations (and, on some CPUs, no AVX512-BF16)
    with pytest.raises(RuntimeError, match="isa must be"):
        ext.bf16_linear(x, w, None, "amx")


def test_kernels_refuse_bad_shapes(ext):
    q, scale = Q.quantize_int8(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="weight"):
        ext.int8_linear(torch.randn(1, 32), q, scale, Q.int8_row_sums(q), None)
    with pytest.raises(RuntimeError, match="row_sums"):
        ext.int8_linear(torch.randn(1, 64), q, scale, Q.int8_row_sums(q).long(), None)
    with pytest.raises(RuntimeError, match="group size"):
        packed, s, m = Q.quantize_int4(torch.randn(8, 64), 32)
        ext.int4_linear(torch.randn(1, 64), packed, s, m, 48, None)


@pytest.mark.parametrize("rows", [1, 3])
def test_rows_shared_out_among_threads_give_one_threads_bits(ext, rows):
    # Large enough that the decode kernels hand out many spans of rows to whichever thread is free
    # (an odd count, so the last span is short): every output row is computed once, as alone.
    torch.manual_seed(5)
    N, K = 1001, 2560
    x = torch.randn(rows, K).bfloat16()
    q, scale = Q.quantize_int8(torch.randn(N, K))
    packed, s4, m4 = Q.quantize_int4(torch.randn(N, K), 64)
    w16, b = torch.randn(N, K).bfloat16(), torch.randn(N).bfloat16()
    cache_k, cache_v = torch.randn(2, 37, 300, 80).bfloat16(), torch.randn(2, 37, 300, 80).bfloat16()
    query = torch.randn(2, 37, 1, 80).bfloat16()
    calls = [lambda: ext.int8_linear(x, q, scale, Q.int8_row_sums(q), b),
             lambda: ext.int4_linear(x, packed, s4, m4, 64, b),
             lambda: ext.bf16_linear(x, w16, b),
             lambda: ext.decode_attention(query, cache_k, cache_v, None, torch.tensor([300, 123]), None, None)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [call() for call in calls]
        torch.set_num_threads(max(threads, 2))
        shared = [call() for call in calls]
    finally:
        torch.set_num_threads(threads)
    for one, many in zip(alone, shared):
        assert torch.equal(one, many)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, heads, length, head_dim",
                         [(1, 32, 300, 80), (3, 4, 37, 64), (2, 2, 1, 12), (1, 8, 45, 32), (1, 2, 19, 20), (1, 2, 16, 96)])
def test_decode_attention_kernel_matches_sdpa_on_cache_slices(ext, dtype, batch, heads, length, head_dim):
    # As the model calls it: q a strided view of the fused projection, k and v slices of a bigger cache.
    torch.manual_seed(2)
    cache_k = torch.randn(batch + 1, heads, length + 9, head_dim, dtype=dtype)
    cache_v = torch.randn(batch + 1, heads, length + 9, head_dim, dtype=dtype)
    k, v = cache_k[:batch, :, :length], cache_v[:batch, :, :length]
    q = torch.randn(batch, 1, heads, 3 * head_dim, dtype=dtype).transpose(1, 2)[..., :head_dim]
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    y = kernels.decode_attention(q, k, v)
    assert y.dtype == dtype and y.shape == (batch, heads, 1, head_dim)
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (y.double() - expected).abs().max() <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_reads_each_rows_cache_row_and_length(ext, dtype):
    # Batched decoding: sequences at different positions, in any rows of a shared cache.
    torch.manual_seed(3)
    cache_k, cache_v = torch.randn(5, 4, 20, 32, dtype=dtype), torch.randn(5, 4, 20, 32, dtype=dtype)
    rows, lengths = torch.tensor([3, 0, 4]), torch.tensor([20, 1, 7])
    q = torch.randn(3, 4, 1, 32, dtype=dtype)
    y = kernels.decode_attention(q, cache_k, cache_v, rows, lengths)
    for b in range(3):
        k, v = cache_k[rows[b], :, :lengths[b]], cache_v[rows[b], :, :lengths[b]]
        expected = F.scaled_dot_product_attention(q[b].double(), k.double(), v.double())
        assert (y[b].double() - expected).abs().max() <= (1e-5 if dtype == torch.float32 else 2 ** -7)
    with pytest.raises(RuntimeError, match="cache row out of range"):
        ext.decode_attention(q, cache_k, cache_v, torch.tensor([0, 1, 5]), None)
    with pytest.raises(RuntimeError, match="key length out of range"):
        ext.decode_attention(q, cache_k, cache_v, rows, torch.tensor([21, 1, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_is_the_kernels_quantization_per_row(dtype):
    torch.manual_seed(4)
    x = (torch.randn(3, 4, 50, 80) * 3).to(dtype)
    x[0, 1, 2] = 0  # a row of zeros: scale 0, dequantized to zeros
    q, scale = ops.quantize_rows(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == x.shape[:-1] and scale[0, 1, 2] == 0
    assert q.abs().max() == 127 and torch.equal(ops.dequantize_rows(q, scale, torch.float32), per_row(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8_cache", [False, True])
def test_store_kv_writes_what_index_copy_writes(ext, dtype, int8_cache):
    """The kernel's writes (and its quantization into an int8 cache) are the PyTorch fallback's, bit for bit."""
    torch.manual_seed(6)
    rows, heads, slots, head_dim = 3, 4, 10, 80
    cache = torch.zeros(rows, heads, slots, head_dim, dtype=torch.int8 if int8_cache else dtype)
    scales = torch.zeros(rows, heads, slots) if int8_cache else None
    # Two tokens of two rows (one per pass row), as a strided view, the way rotary_heads returns them.
    x = torch.randn(3, 2, heads, 2, head_dim, dtype=dtype)[1]
    where = (torch.tensor([2, 0])[:, None] * heads + torch.arange(heads)[None, :]) * slots  # [batch, heads]
    flat = (where[:, :, None] + torch.tensor([[4, 5], [0, 9]])[:, None, :]).reshape(-1)
    expected_cache, expected_scales = cache.clone(), None if scales is None else scales.clone()
    stored = ops.quantize_rows(x) if int8_cache else (x,)
    expected_cache.view(-1, head_dim).index_copy_(0, flat, stored[0].reshape(-1, head_dim))
    if int8_cache:
        expected_scales.view(-1).index_copy_(0, flat, stored[1].reshape(-1))
    assert ops.store_kv(cache, scales, flat, x)
    assert torch.equal(cache, expected_cache) and (scales is None or torch.equal(scales, expected_scales))
    with pytest.raises(RuntimeError, match="cache slot out of range"):
        ext.store_kv(cache, scales, flat + rows * heads * slots, x)
    with pytest.raises(RuntimeError, match="scales go with an int8 cache"):
        ext.store_kv(cache, None if int8_cache else torch.zeros(rows, heads, slots), flat, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [80, 64, 20])
def test_decode_attention_over_an_int8_cache_is_attention_over_its_dequantized_values(ext, dtype, head_dim):
    torch.manual_seed(5)
    k, k_scale = ops.quantize_rows(torch.randn(5, 4, 33, head_dim))
    v, v_scale = ops.quantize_rows(torch.randn(5, 4, 33, head_dim))
    rows, lengths = torch.tensor([3, 0, 4]), torch.tensor([33, 1, 12])
    q = torch.randn(3, 4, 1, head_dim, dtype=dtype)
    y = kernels.decode_attention(q, k, v, rows, lengths, k_scale, v_scale)
    assert y.dtype == dtype
    for b in range(3):
        r, n = rows[b], lengths[b]
        expected = F.scaled_dot_product_attention(q[b].double(), ops.dequantize_rows(k[r, :, :n], k_scale[r, :, :n], torch.float64),
                                                  ops.dequantize_rows(v[r, :, :n], v_scale[r, :, :n], torch.float64))
        assert (y[b].double() - expected).abs().max() <= (1e-5 if dtype == torch.float32 else 2 ** -7)


def test_decode_attention_is_what_bf16_decoding_uses(ext, monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "decode_attention",
                        lambda q, k, v, *index: calls.append(q.shape) or ext.decode_attention(q, k, v, *index))
    model = GPTNeoX(CONFIG).to(torch.bfloat16).eval()
    prompt = torch.randint(0, CONFIG.vocab_size, (1, 9))
    with torch.inference_mode():
        full = model(torch.cat((prompt, prompt[:, :1]), dim=1))[:, -1]
        cache = KVCache.for_model(model, 1, 16)
        model(prompt, cache=cache, input_pos=0)
        assert not calls  # the prompt goes through the prompt attention kernel (or SDPA)
        step = model(prompt[:, :1], cache=cache, input_pos=9)[:, -1]
    assert len(calls) == CONFIG.num_layers
    assert (step.float() - full.float()).abs().max() < 0.1 * full.float().abs().max()
    assert step.argmax() == full.argmax()


def test_decode_attention_refuses_mismatched_inputs(ext):
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 10, 16)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        ext.decode_attention(q, k, torch.randn(1, 4, 11, 16))
    with pytest.raises(RuntimeError, match="q's dtype, or be int8"):
        ext.decode_attention(q, k.bfloat16(), k.bfloat16())
    k8 = torch.zeros(1, 4, 10, 16, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="v_scale go with an int8 cache"):
        ext.decode_attention(q, k8, k8)
    with pytest.raises(RuntimeError, match=r"float32 \[R, H, L\]"):
        ext.decode_attention(q, k8, k8, k_scale=torch.ones(1, 4, 9), v_scale=torch.ones(1, 4, 9))


def causal_reference(q, k, v, start):
    """softmax(q kᵀ/√D) v in float64, query t seeing keys 0..start+t."""
    T, L = q.shape[2], k.shape[2]
    visible = torch.arange(L)[None, :] <= (start + torch.arange(T))[:, None]
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=visible)


@pytest.mark.parametrize("batch, heads, steps, start, head_dim", [(1, 32, 70, 0, 80), (2, 3, 17, 45, 32),
                                                                  (1, 2, 5, 1, 16), (1, 1, 130, 200, 64)])
def test_prefill_attention_kernel_matches_causal_attention(ext, batch, heads, steps, start, head_dim):
    if not ext.bf16_attention_available():
        pytest.skip("the prompt attention kernel needs AVX512-BF16")
    # As the model calls it: q a strided view of the fused projection, k and v slices of a bigger cache.
    torch.manual_seed(4)
    length = start + steps
    cache_k = torch.randn(batch + 1, heads, length + 9, head_dim, dtype=torch.bfloat16)
    cache_v = torch.randn(batch + 1, heads, length + 9, head_dim, dtype=torch.bfloat16)
    k, v = cache_k[:batch, :, :length], cache_v[:batch, :, :length]
    q = torch.randn(batch, steps, heads, 3 * head_dim, dtype=torch.bfloat16).transpose(1, 2)[..., :head_dim] * 2
    y = ops.prefill_attention(q, k, v, start)
    assert y.dtype == torch.bfloat16 and y.shape == (batch, heads, steps, head_dim)
    expected = causal_reference(q, k, v, start)
    sdpa_error = (causal_reference(q, k, v, start).bfloat16().double() - expected).abs().max()
    # as close as the bf16 rounding of the exact result (fp32 sums, fp32 probabilities)
    assert (y.double() - expected).abs().max() <= 2 * sdpa_error
    assert (y.double() - expected).abs().mean() <= 2 ** -10


def whole_prompt_and_in_two_chunks(per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 model's last logits for a 40-token prompt run whole (from slot 0 of a cache), then run
    as 30 + 10 tokens: from slot 0 of row 0 (`start`), or as the engine runs chunks, with per-row
    positions in its own cache row (row 2)."""
    model = GPTNeoX(CONFIG).to(torch.bfloat16).eval()
    prompt = torch.randint(0, CONFIG.vocab_size, (1, 40))
    with torch.inference_mode():
        full = model(prompt, cache=KVCache.for_model(model, 3, 64), input_pos=0)[:, -1]
        cache = KVCache.for_model(model, 3, 64)
        if per_row:
            row = torch.tensor([2])
            model(prompt[:, :30], cache=cache, input_pos=torch.arange(30)[None], cache_rows=row)
            tail = model(prompt[:, 30:], cache=cache, input_pos=torch.arange(30, 40)[None], cache_rows=row)[:, -1]
        else:
            model(prompt[:, :30], cache=cache, input_pos=0)
            tail = model(prompt[:, 30:], cache=cache, input_pos=30)[:, -1]
    return full, tail


@pytest.mark.parametrize("per_row", [False, True], ids=["contiguous-slots", "engine-rows"])
def test_bf16_prompt_chunks_over_the_cache_take_the_prefill_kernel(ext, monkeypatch, per_row):
    # Both ways a prompt runs: from slot 0 of row 0 (start), and as the engine runs a chunk, with
    # per-row positions in its own cache row.
    if not ext.bf16_attention_available():
        pytest.skip("the prompt attention kernel needs AVX512-BF16")
    monkeypatch.setattr(ops, "sdpa_on_tiles", lambda: False)  # the kernel's route, on AMX CPUs too
    calls = []
    monkeypatch.setattr(ops, "prefill_attention",
                        lambda q, k, v, start: calls.append((q.shape[2], start)) or ext.prefill_attention(q, k, v, start))
    full, tail = whole_prompt_and_in_two_chunks(per_row)
    assert calls == [(40, 0)] * CONFIG.num_layers + [(30, 0)] * CONFIG.num_layers + [(10, 30)] * CONFIG.num_layers
    assert (tail.float() - full.float()).abs().max() < 0.05 * full.float().abs().max()


@pytest.mark.parametrize("per_row", [False, True], ids=["contiguous-slots", "engine-rows"])
def test_where_sdpa_runs_on_amx_tiles_prompt_chunks_take_it_over_a_view_of_their_row(ext, monkeypatch, per_row):
    # On AMX CPUs SDPA is faster than the prompt kernel: chunks go to it with their own cache row
    # cut at the last query's key (no copy of the cache), causal from slot 0, masked after it.
    monkeypatch.setattr(ops, "sdpa_on_tiles", lambda: True)
    monkeypatch.setattr(ops, "prefill_attention", lambda *args: pytest.fail("the prompt kernel ran"))
    calls, real_sdpa = [], F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, is_causal=False):
        calls.append((q.shape[2], k.shape[0], k.shape[2], is_causal, attn_mask is not None,
                      k.untyped_storage().nbytes() > k.numel() * k.element_size()))  # inside the cache
        return real_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    monkeypatch.setattr(ops.F, "scaled_dot_product_attention", sdpa)
    full, tail = whole_prompt_and_in_two_chunks(per_row)
    layers = CONFIG.num_layers
    assert calls == ([(40, 1, 40, True, False, True)] * layers + [(30, 1, 30, True, False, True)] * layers
                     + [(10, 1, 40, False, True, True)] * layers)
    assert (tail.float() - full.float()).abs().max() < 0.05 * full.float().abs().max()


def test_prefill_attention_refuses_what_it_cannot_do(ext):
    if not ext.bf16_attention_available():
        pytest.skip("the prompt attention kernel needs AVX512-BF16")
    q, k = torch.randn(1, 2, 4, 16).bfloat16(), torch.randn(1, 2, 10, 16).bfloat16()
    with pytest.raises(RuntimeError, match="slots 0 .. start"):
        ext.prefill_attention(q, k, k, 7)
    with pytest.raises(RuntimeError, match="bf16"):
        ext.prefill_attention(q.float(), k.float(), k.float(), 0)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ext.prefill_attention(q[..., :8], k[..., :8], k[..., :8], 0)


def fused_projection_views(batch, heads, steps, head_dim, dtype, seed):
    """q, k, v [B, H, T, D] as the model's fused projection gives them: strided views of one tensor."""
    torch.manual_seed(seed)
    qkv = torch.randn(batch, steps, heads, 3 * head_dim, dtype=torch.float64).transpose(1, 2)
    q, k, v = qkv.chunk(3, dim=-1)
    return (q * 2).to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, heads, steps, head_dim", [(1, 1, 1, 16), (2, 3, 5, 32), (1, 2, 64, 32),
                                                           (2, 2, 100, 80), (1, 1, 130, 256)])
def test_train_attention_matches_causal_sdpa_forward_and_backward(ext, dtype, batch, heads, steps, head_dim):
    if not ext.train_attention_available():
        pytest.skip("the training attention kernel needs AVX-512")
    q, k, v = fused_projection_views(batch, heads, steps, head_dim, dtype, seed=steps)
    grad = torch.randn(batch, heads, steps, head_dim).to(dtype)
    # The reference: float64 math on the same (rounded) inputs.
    exact = [t.double().detach().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*exact, is_causal=True)
    expected.backward(grad.double())
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    y = ops.train_attention(*inputs)[0]
    y.backward(grad)
    assert y.dtype == dtype and y.shape == q.shape
    tolerance = 1e-5 if dtype == torch.float32 else 1.5e-2  # bf16: its rounding of the result, ~2^-8
    for ours, reference in zip([y] + [t.grad for t in inputs], [expected] + [t.grad for t in exact]):
        assert ours.dtype == dtype
        assert (ours.double() - reference).abs().max() <= tolerance * reference.abs().max() + 1e-5


def test_train_attention_is_a_well_formed_custom_op(ext):
    # Its fake (shape) functions, autograd registration and compiled (AOT) dispatch, as torch.compile uses them.
    if not ext.train_attention_available():
        pytest.skip("the training attention kernel needs AVX-512")
    q, k, v = (t.detach().requires_grad_() for t in fused_projection_views(2, 2, 70, 32, torch.float32, seed=1))
    torch.library.opcheck(ops.train_attention, (q, k, v))


def test_a_training_step_takes_the_kernel_and_gets_sdpas_gradients(ext, monkeypatch):
    # As training runs it: the model in train mode under bf16 autocast (q and k leave the rotary in
    # fp32 beside a bf16 v); the same step through SDPA gives the same gradients.
    if not ext.train_attention_available():
        pytest.skip("the training attention kernel needs AVX-512")
    from stablecode.train.loop import next_token_loss

    torch.manual_seed(0)
    model = GPTNeoX(CONFIG).train()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 97))

    def gradients():
        model.zero_grad(set_to_none=True)
        next_token_loss(model, tokens[:, :-1], tokens[:, 1:], True).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    calls = []
    kernel = ops.train_attention
    monkeypatch.setattr(ops, "train_attention", lambda q, k, v: calls.append(q.dtype) or kernel(q, k, v))
    ours = gradients()
    assert calls == [torch.bfloat16] * CONFIG.num_layers
    monkeypatch.setattr(ops, "use_train_attention", lambda q, k, v: False)
    reference = gradients()
    assert len(calls) == CONFIG.num_layers
    for name, grad in reference.items():
        assert (ours[name] - grad).norm() <= 0.02 * grad.norm(), name


def test_train_attention_refuses_what_it_cannot_do(ext):
    if not ext.train_attention_available():
        pytest.skip("the training attention kernel needs AVX-512")
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match="alike"):
        ext.train_attention(q, torch.randn(1, 2, 5, 16), q)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        ext.train_attention(q, q.bfloat16(), q)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ext.train_attention(q[..., :8], q[..., :8], q[..., :8])
    assert not ops.use_train_attention(q, q, q)  # no gradients wanted: inference keeps its own paths


def test_the_int8_peak_probe_reports_the_instruction_set_it_timed(ext):
    ops_per_s, isa = ext.int8_peak(100_000)
    # by default the instruction set the prompt GEMMs use: AMX tiles, vpdpbusd or AVX2's multiply-adds
    assert isa == ext.prompt_isa()
    assert (ops_per_s > 1e9) == bool(isa)
    if isa == "amx":  # a tile product does 8x the pairs of a vpdpbusd: the AMX ceiling is far above VNNI's
        amx, vnni = (max(ext.int8_peak(1_000_000, kind)[0] for _ in range(3)) for kind in ("amx", "avx512-vnni"))
        assert amx > 2 * vnni
    with pytest.raises(RuntimeError, match="isa must be"):
        ext.int8_peak(10, "sse")


# ---- the small ops of a decode step -------------------------------------------------------------

def reference_heads(qkv, cos, sin, head_dim):
    batch, steps, _ = qkv.shape
    q, k, v = qkv.view(batch, steps, -1, 3 * head_dim).transpose(1, 2).chunk(3, dim=-1)
    return M.apply_rotary(q, cos, sin), M.apply_rotary(k, cos, sin), v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,steps,heads,head_dim,rotary", [(1, 1, 32, 80, 20), (3, 7, 4, 16, 4), (1, 130, 8, 64, 64)])
@pytest.mark.parametrize("per_row", [False, True])
def test_rotary_heads_gives_apply_rotarys_bits(ext, dtype, batch, steps, heads, head_dim, rotary, per_row):
    """q, k rotated and v from the fused projection, equal bit for bit to the PyTorch form (whose
    products and sum each round to the dtype), for one start shared by all rows or per-row positions."""
    generator = torch.Generator().manual_seed(steps)
    qkv = torch.randn(batch, steps, heads * 3 * head_dim, generator=generator).to(dtype)
    angles = torch.rand(200, rotary, generator=generator) * 50
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    if per_row:
        positions = torch.randint(0, 200, (batch, steps), generator=generator)
        cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    else:
        cos, sin = cos[5:5 + steps], sin[5:5 + steps]
    got = ops.rotary_heads(qkv, cos, sin, head_dim)
    for name, a, b in zip("qkv", got, reference_heads(qkv, cos, sin, head_dim)):
        assert a.shape == (batch, heads, steps, head_dim) and a.is_contiguous()
        assert torch.equal(a, b), name


def test_rotary_heads_refuses_what_it_cannot_do(ext):
    qkv, cos = torch.randn(1, 2, 3 * 16), torch.randn(1, 2, 4)
    with pytest.raises(RuntimeError, match="heads \\* 3 \\* head_dim"):
        ext.rotary_heads(qkv, cos, cos, 10)
    with pytest.raises(RuntimeError, match="even rotary dims"):
        ext.rotary_heads(qkv, torch.randn(1, 2, 3), torch.randn(1, 2, 3), 16)
    with pytest.raises(RuntimeError, match="qkv's dtype"):
        ext.rotary_heads(qkv, cos.bfloat16(), cos.bfloat16(), 16)
    assert not ops.use_rotary_kernel(qkv.requires_grad_(), cos)  # training keeps the PyTorch form (autograd)


def test_the_model_runs_the_rotary_kernel_where_it_applies_and_its_logits_are_the_same(ext, monkeypatch):
    model = GPTNeoX(CONFIG).to(torch.bfloat16).eval()
    prompt = torch.randint(0, CONFIG.vocab_size, (2, 9))
    calls = []
    monkeypatch.setattr(M, "rotary_heads", lambda *a: calls.append(a[0].shape) or ops.rotary_heads(*a))
    with torch.inference_mode():
        fused = model(prompt)
        assert len(calls) == CONFIG.num_layers
        monkeypatch.setattr(M, "use_rotary_kernel", lambda qkv, cos: False)
        assert torch.equal(model(prompt), fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_is_the_exact_erf_gelu(ext, dtype):
    x = torch.cat((torch.linspace(-12, 12, 20001), torch.randn(10240, generator=torch.Generator().manual_seed(1)) * 4))
    x = x.to(dtype)[:30001]  # under SERIAL_GELU_MAX: the kernel's loop (and an odd tail)
    exact = F.gelu(x.double())
    got = ops.gelu(x).double()
    if dtype == torch.float32:
        assert (got - exact).abs().max() <= 5e-7
        assert ((got - exact).abs() <= 1.2e-6).all() and ((F.gelu(x).double() - exact).abs() <= 1.2e-6).all()
    else:  # rounded to bf16: within its half-ulp of the exact value, as F.gelu's
        assert ((got - exact).abs() <= 2 ** -8 * exact.abs() + 1e-6).all()
    big = torch.randn(4, 10240).to(dtype)  # above SERIAL_GELU_MAX: F.gelu itself
    assert torch.equal(ops.gelu(big), F.gelu(big))
    for other in (x[:64].view(8, 8).T, x[:64].half()):  # strided, or another dtype: F.gelu
        assert torch.equal(ops.gelu(other), F.gelu(other))
    y = x[:10].clone().requires_grad_()
    ops.gelu(y).sum().backward()  # with gradients wanted it is F.gelu, differentiable
    assert y.grad is not None
