"""The prompt GEMMs (int8 x int8 on AMX tiles, with AVX-512 VNNI, or with AVX2's vpmaddwd; activations
quantized per token) against reference math and against each other, and the layers' choice between them
and the dequantize-then-float path."""

import pytest
import torch

from stablecode import kernels
from stablecode import quantize as Q
from stablecode.kernels import ops


@pytest.fixture(scope="module")
def ext():
    library = kernels.load()
    if library is None:
        pytest.fail("the CPU kernels did not build on this machine (see the warning above)")
    return library


@pytest.fixture(scope="module")
def amx(ext):
    if not ext.prompt_isa():
        pytest.skip("this CPU has none of AMX-INT8, AVX-512 VNNI, AVX2: prompts take the float path (tested below)")
    return ext


def available_isas(ext) -> list[str]:
    """Every prompt kernel this CPU can run, best first (an AMX CPU also runs the VNNI and AVX2 ones)."""
    flags = open("/proc/cpuinfo").read()
    isas = [isa for isa, flag in (("amx", "amx_int8"), ("avx512-vnni", "avx512_vnni")) if f" {flag}" in flags]
    return isas + (["avx2"] if ext.simd() == "avx2" else [])


def per_token(x: torch.Tensor) -> torch.Tensor:
    """x after the prompt kernels' quantization: int8 per row, scale max|x|/127, round half to even."""
    x = x.double()
    amax = x.abs().amax(-1, keepdim=True).float()
    inv = torch.where(amax > 0, torch.div(torch.full_like(amax, 127.0), amax), torch.zeros_like(amax))
    return torch.round(x.float() * inv).double() * (amax.double() / 127.0)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.double() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("rows", [17, 32, 45, 128, 150])  # 150: more than one 64-row chunk of the AVX2 kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_prompt_gemm_is_per_token_int8_math(amx, rows, dtype):
    torch.manual_seed(rows)
    w, b, x = torch.randn(96, 320) * 0.05, torch.randn(96), torch.randn(rows, 320).to(dtype)
    q, scale = Q.quantize_int8(w)
    reference = per_token(x) @ Q.dequantize_int8(q, scale).double().t() + b.double()
    for isa in available_isas(amx):
        y = amx.prompt_int8_linear(x, q, scale, b.to(dtype), isa)
        assert y.dtype == dtype and y.shape == (rows, 96)
        # fp32: only the float rescale rounds; bf16: the output's own rounding (8 bits).
        assert relative_error(y, reference) < (1e-5 if dtype == torch.float32 else 1e-2), isa
    assert torch.equal(ops.prompt_int8_linear(x, q, scale, b.to(dtype)),
                       amx.prompt_int8_linear(x, q, scale, b.to(dtype), amx.prompt_isa()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_give_the_same_bits_in_every_kernel_and_batch(amx, dtype):
    """A token's output does not depend on the kernel or on the rows computed with it: decoding one
    token, a speculative pass of several, and a prompt all agree bit for bit, so speculation and
    prefix reuse cannot change greedy output."""
    torch.manual_seed(7)
    w, b, x = torch.randn(96, 320) * 0.05, torch.randn(96).to(dtype), torch.randn(40, 320).to(dtype)
    x[3] *= 40  # rows of very different scales
    q, scale = Q.quantize_int8(w)
    sums = Q.int8_row_sums(q)
    one_at_a_time = torch.cat([amx.int8_linear(x[i:i + 1], q, scale, sums, b) for i in range(len(x))])
    for isa in available_isas(amx):
        assert torch.equal(amx.prompt_int8_linear(x, q, scale, b, isa), one_at_a_time), isa
    for rows in (2, 5, 9, 16):
        assert torch.equal(amx.int8_linear(x[:rows], q, scale, sums, b), one_at_a_time[:rows])


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_prompt_gemm_stays_close_to_the_int4_weights(amx, group_size):
    torch.manual_seed(group_size)
    w, x = torch.randn(64, 512) * 0.05, torch.randn(40, 512)
    packed, scale, minimum = Q.quantize_int4(w, group_size)
    dequantized = Q.dequantize_int4(packed, scale, minimum, group_size).double()
    exact = per_token(x) @ dequantized.t()
    # The 4-bit weights are re-gridded to int8 per output channel: an error far below int4's own.
    int4_error = relative_error(x.double() @ w.double().t(), exact)
    outputs = {isa: amx.prompt_int4_linear(x, packed, scale, minimum, group_size, None, isa)
               for isa in available_isas(amx)}
    for isa, y in outputs.items():
        assert relative_error(y, exact) < 0.25 * int4_error, isa
    # every kernel re-grids to the same int8 weights and sums exactly: the same bits
    first = next(iter(outputs.values()))
    assert all(torch.equal(y, first) for y in outputs.values()), list(outputs)


@pytest.mark.parametrize("rows", [500, 600])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_long_activations_summed_over_k_slices_give_the_same_bits(amx, method, rows):
    """500 rows x 3,200 columns of packed activations (1.6 MB) exceed the AMX loop's L2 slice, so K is
    summed in two slices whose int32 partial sums carry over; a 128-wide int4 group straddles the
    slice boundary; 600 rows run as a chunk of 512 rows and one of 88. Every kernel still gives the
    same bits, and the per-token int8 result."""
    torch.manual_seed(3)
    w, b, x = torch.randn(64, 3200) * 0.05, torch.randn(64), torch.randn(rows, 3200)
    if method == "int8":
        q, scale = Q.quantize_int8(w)
        outputs = {isa: amx.prompt_int8_linear(x, q, scale, b, isa) for isa in available_isas(amx)}
        reference = per_token(x) @ Q.dequantize_int8(q, scale).double().t() + b.double()
        assert relative_error(next(iter(outputs.values())), reference) < 1e-5
    else:
        packed, scale, minimum = Q.quantize_int4(w, 128)
        outputs = {isa: amx.prompt_int4_linear(x, packed, scale, minimum, 128, b, isa) for isa in available_isas(amx)}
    first = next(iter(outputs.values()))
    assert all(torch.equal(y, first) for y in outputs.values()), list(outputs)


def test_prompt_gemm_rejects_shapes_it_cannot_tile(amx):
    q, scale = Q.quantize_int8(torch.randn(48, 128))
    with pytest.raises(RuntimeError, match="N % 32"):
        ops.prompt_int8_linear(torch.randn(20, 128), q, scale, None)


def test_prompt_isa_follows_the_cpu_flags(ext):
    isas = available_isas(ext)
    assert ext.prompt_isa() == (isas[0] if isas else "")
    assert ops.prompt_isa() == ext.prompt_isa()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_layers_run_prompts_in_int8_and_float_on_request(amx, method):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    layer = Q.Int8Linear.from_linear(linear) if method == "int8" else Q.Int4Linear.from_linear(linear)
    x = torch.randn(2, 50, 256)
    with torch.inference_mode():
        quantized = layer(x)
        layer.prompt_precision = "float"
        floating = layer(x)
    exact = x.double() @ layer.dequantized().double().t() + linear.bias.detach().double()
    assert relative_error(floating, exact) < 1e-5  # the dequantized weights in fp32
    assert 1e-5 < relative_error(quantized, exact) < 0.02  # activations rounded to int8 per token


def test_set_prompt_precision_reaches_every_quantized_layer():
    from stablecode import GPTNeoX, ModelConfig

    model = GPTNeoX(ModelConfig(name="t", vocab_size=96, hidden_size=64, num_layers=2, num_heads=2,
                                intermediate_size=128, max_position_embeddings=32))
    Q.quantize_model(model, "int8")
    Q.set_prompt_precision(model, "float")
    layers = [m for m in model.modules() if isinstance(m, Q.Int8Linear)]
    assert layers and all(m.prompt_precision == "float" for m in layers)
    with pytest.raises(ValueError, match="prompt precision"):
        Q.set_prompt_precision(model, "fp8")


def test_prompt_kernels_apply_only_to_prompts(ext):
    assert ops.use_prompt_kernels(torch.randn(17, 256), 128) == bool(ext.prompt_isa())
    assert not ops.use_prompt_kernels(torch.randn(16, 256), 128)  # the decode kernels' rows
    assert not ops.use_prompt_kernels(torch.randn(64, 96), 128)  # K not a multiple of 64
    assert not ops.use_prompt_kernels(torch.randn(64, 256), 100)  # N not a multiple of 32
    assert not ops.use_prompt_kernels(torch.randn(64, 256, requires_grad=True), 128)


def test_without_prompt_kernels_prompts_take_the_dequantized_gemm(ext, monkeypatch):
    """What a CPU without AVX2 does (or a layer whose shape the GEMMs cannot tile): the float path."""
    monkeypatch.setattr(ops, "use_prompt_kernels", lambda rows, n: False)
    monkeypatch.setattr(Q, "use_prompt_kernels", lambda rows, n: False)
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 128)
    layer = Q.Int8Linear.from_linear(linear)
    x = torch.randn(64, 256)
    with torch.inference_mode():
        y = layer(x)
    assert relative_error(y, x.double() @ layer.dequantized().double().t() + linear.bias.detach().double()) < 1e-5
