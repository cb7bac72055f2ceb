"""Weight-only int8 / int4 quantization: kernels against reference math, models against float, checkpoints."""

import json

import pytest
import torch
import torch.nn.functional as F

from stablecode import GPTNeoX, ModelConfig, load_model
from stablecode import quantize as Q
from stablecode.checkpoint import save_quantized
from stablecode.kernels import build, ops
from stablecode.kernels import load as load_kernels
from stablecode.errors import CheckpointError
from stablecode.kv_cache import KVCache
from stablecode.model import init_weights

CONFIG = ModelConfig(name="quant-test", vocab_size=320, hidden_size=128, num_layers=2, num_heads=4,
                     intermediate_size=512, max_position_embeddings=128)


@pytest.fixture(scope="module")
def ext():
    kernels = load_kernels()
    if kernels is None:
        pytest.fail("the CPU kernels did not build on this machine (see the warning above)")
    return kernels


def random_model(config=CONFIG, seed=0, dtype=torch.float32) -> GPTNeoX:
    torch.manual_seed(seed)
    model = GPTNeoX(config)
    init_weights(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


# ---- the quantization math -------------------------------------------------------------------

def test_int8_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different ranges
    q, scale = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    error = (Q.dequantize_int8(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("shape", [(3, 64), (5000, 1024), (4097, 1024)])  # one block; several; a ragged last
def test_int8_row_sums_are_the_exact_row_sums(shape):
    torch.manual_seed(shape[0])
    q = torch.randint(-127, 128, shape, dtype=torch.int8)
    sums = Q.int8_row_sums(q)
    assert sums.dtype == torch.int32 and torch.equal(sums, q.to(torch.int64).sum(1).to(torch.int32))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_error_is_at_most_half_a_step(group_size):
    w = torch.randn(48, 256)
    w[3] = 0.5  # a constant row must survive (zero scale)
    packed, scale, minimum = Q.quantize_int4(w, group_size)
    assert packed.shape == (48, 128) and packed.dtype == torch.uint8
    assert scale.shape == minimum.shape == (48, 256 // group_size) and scale.dtype == torch.float16
    values = Q.unpack_int4(packed)
    assert values.max() <= 15 and torch.equal(Q.pack_int4(values), packed)
    error = (Q.dequantize_int4(packed, scale, minimum, group_size) - w).abs().view(48, -1, group_size)
    assert (error <= scale.float()[..., None] / 2 + 1e-3 * w.abs().max()).all()
    assert torch.allclose(Q.dequantize_int4(packed, scale, minimum, group_size)[3], w[3], atol=1e-3)


def test_bad_quantization_settings_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.quantize_int4(torch.randn(8, 96), 48)
    with pytest.raises(ValueError, match="does not divide"):
        Q.quantize_int4(torch.randn(8, 96), 64)
    with pytest.raises(ValueError, match="inf or nan"):
        Q.quantize_int4(torch.full((4, 64), float("inf")), 32)
    with pytest.raises(ValueError, match="unknown quantization"):
        Q.quantize_model(random_model(), "int3")


# ---- layers and whole models -----------------------------------------------------------------

@pytest.mark.parametrize("method", ["int8", "int4"])
def test_layer_paths_agree(ext, method, monkeypatch):
    """Decode kernel, PyTorch's weight-only kernel and dequantize + GEMM give the same layer output."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96).to(torch.bfloat16)
    layer = Q.Int8Linear.from_linear(linear) if method == "int8" else Q.Int4Linear.from_linear(linear, 64)
    x = torch.randn(1, 3, 128).bfloat16()
    reference = F.linear(x.float(), layer.dequantized(), layer.bias.float())
    with torch.no_grad():
        kernel = layer(x)
        monkeypatch.setattr(build, "_library", None)
        torch_kernel = layer(x)
        monkeypatch.setattr(ops, "DECODE_MAX_ROWS", 0)
        gemm = layer(x)
    assert kernel.shape == torch_kernel.shape == gemm.shape == (1, 3, 96)
    scale = reference.abs().max()
    for y in (kernel, torch_kernel, gemm):
        assert (y.float() - reference).abs().max() <= 0.03 * scale


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y - reference).norm() / (reference - reference.mean()).norm()).item()


# Measured on this random model: int8 ~0.02, int4 (group 64) ~0.19 relative error; random Gaussian
# weights are the hard case for 4 bits (trained weights: see docs/performance.md).
@pytest.mark.parametrize("method,max_error", [("int8", 0.04), ("int4", 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_model_logits_close_to_float(ext, method, max_error, dtype):
    model = random_model(dtype=dtype)
    torch.manual_seed(0)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 40))
    with torch.no_grad():
        exact = model(ids).float()
        Q.quantize_model(model, method)
        prefill = model(ids).float()
        # Decode path (the kernels): the same tokens fed one at a time through the KV cache.
        cache = KVCache.for_model(model, 1, 40)
        steps = [model(ids[:, i:i + 1], cache=cache, input_pos=i).float() for i in range(ids.shape[1])]
    decode = torch.cat(steps, dim=1)
    assert relative_error(prefill, exact) <= max_error
    assert relative_error(decode, exact) <= max_error
    # Decode differs from prefill only by the int8 activations: much less than the weights' error.
    assert relative_error(decode, prefill) <= 0.05
    if method == "int8":
        assert (decode.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9
    assert isinstance(model.embed_out, Q.Int8Linear if method == "int8" else Q.Int4Linear)
    assert model.gpt_neox.embed_in.weight.dtype == dtype  # the embedding stays float


def test_tied_head_stays_float():
    model = random_model(CONFIG.replace(tie_word_embeddings=True))
    Q.quantize_model(model, "int8")
    assert type(model.embed_out) is torch.nn.Linear
    assert model.embed_out.weight is model.gpt_neox.embed_in.weight


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_checkpoint_loads_without_requantizing(tmp_path, byte_tokenizer_file, method):
    model = Q.quantize_model(random_model(), method, group_size=32)
    save_quantized(model, tmp_path / "q", tokenizer_file=byte_tokenizer_file)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["stablecode_method"] == method

    loaded = load_model(tmp_path / "q")
    assert loaded.quantization == model.quantization
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for name, tensor in saved_state.items():  # bit-identical: nothing was quantized again
        assert loaded_state[name].dtype == tensor.dtype and torch.equal(loaded_state[name], tensor), name
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        # A token a row: the decode kernels, with the weight row sums derived again at load.
        assert torch.equal(loaded(ids[:, :1]), model(ids[:, :1]))
        assert torch.equal(loaded(ids[:1, :1]), model(ids[:1, :1]))
    if method == "int8":
        assert torch.equal(loaded.embed_out.row_sums, loaded.embed_out.weight.sum(1, dtype=torch.int32))
    # Asking for the stored method is fine; asking for another one is a clear error.
    assert isinstance(load_model(tmp_path / "q", quantize=method).embed_out, type(model.embed_out))
    with pytest.raises(CheckpointError, match="cannot load it as"):
        load_model(tmp_path / "q", quantize="int4" if method == "int8" else "int8")


def test_quantized_checkpoint_with_bf16_floats(tmp_path):
    model = Q.quantize_model(random_model(dtype=torch.bfloat16), "int8")
    save_quantized(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q", dtype="float32")  # floats convert; int8 weights and scales do not
    assert loaded.gpt_neox.embed_in.weight.dtype == torch.float32
    assert loaded.embed_out.weight.dtype == torch.int8 and loaded.embed_out.scale.dtype == torch.float32
    assert torch.equal(loaded.embed_out.weight, model.embed_out.weight)


def edit_config(directory, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def test_corrupt_quantization_description_is_a_clear_error(tmp_path):
    save_quantized(Q.quantize_model(random_model(), "int8"), tmp_path / "q")
    edit_config(tmp_path / "q", lambda c: c["quantization_config"].update(stablecode_method="int3"))
    with pytest.raises(CheckpointError, match="quantization"):
        load_model(tmp_path / "q")


def test_another_tools_quantization_is_refused(tmp_path):
    save_quantized(Q.quantize_model(random_model(), "int8"), tmp_path / "q")
    edit_config(tmp_path / "q", lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}))
    with pytest.raises(CheckpointError, match="another tool.*gptq"):
        load_model(tmp_path / "q")


def test_loading_a_stored_quantized_checkpoint_loads_the_kernels(ext, tmp_path, monkeypatch):
    from stablecode.kernels import build

    save_quantized(Q.quantize_model(random_model(), "int8"), tmp_path / "q")
    monkeypatch.setattr(build, "_library", None)
    monkeypatch.setattr(build, "_attempted", False)  # as in a fresh process, the library already built
    load_model(tmp_path / "q")
    assert build.loaded() is not None


def test_checkpoints_of_earlier_versions_with_quantization_json_still_load(tmp_path):
    model = Q.quantize_model(random_model(), "int4", group_size=32)
    save_quantized(model, tmp_path / "q")
    edit_config(tmp_path / "q", lambda c: c.pop("quantization_config"))
    (tmp_path / "q" / "quantization.json").write_text('{"method": "int4", "group_size": 32}')
    assert load_model(tmp_path / "q").quantization == {"method": "int4", "group_size": 32}
    (tmp_path / "q" / "quantization.json").write_text('{"method": "int3"}')
    with pytest.raises(CheckpointError, match="quantization"):
        load_model(tmp_path / "q")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_transformers_refuses_a_quantized_checkpoint(tmp_path, method):
    """Read as a float checkpoint, int8 values would be weights of magnitude ~100: nonsense, silently."""
    transformers = pytest.importorskip("transformers")
    save_quantized(Q.quantize_model(random_model(), method, group_size=32), tmp_path / "q")
    for loader in (transformers.GPTNeoXForCausalLM, transformers.AutoModelForCausalLM):
        with pytest.raises(ValueError, match="quant"):
            loader.from_pretrained(tmp_path / "q")


def test_save_checkpoint_of_a_quantized_model_keeps_its_format(tmp_path):
    from stablecode import save_checkpoint

    model = Q.quantize_model(random_model(), "int8")
    save_checkpoint(model, tmp_path / "q", dtype=torch.bfloat16)  # floats to bf16; int8 weights and scales kept
    loaded = load_model(tmp_path / "q")
    assert loaded.quantization == {"method": "int8"}
    assert torch.equal(loaded.embed_out.weight, model.embed_out.weight) and loaded.embed_out.scale.dtype == torch.float32
    assert loaded.gpt_neox.embed_in.weight.dtype == torch.bfloat16


def test_load_model_quantize_option(tiny_checkpoint):
    model = load_model(tiny_checkpoint, quantize="int4")
    assert isinstance(model.gpt_neox.layers[0].mlp.dense_h_to_4h, Q.Int4Linear)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_large_bf16_cpu_model_uses_fast_layers(tmp_path, monkeypatch):
    from stablecode import save_checkpoint

    monkeypatch.setattr(build, "BUILD_MIN_PARAMETERS", CONFIG.num_parameters)
    save_checkpoint(random_model(dtype=torch.bfloat16), tmp_path / "bf16")
    model = load_model(tmp_path / "bf16")
    layer = model.gpt_neox.layers[0].attention.query_key_value
    assert isinstance(layer, Q.Bf16Linear) and isinstance(layer, torch.nn.Linear)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 30))
    with torch.no_grad():
        fast = model(ids).float()
        cache = KVCache.for_model(model, 1, 30)
        decode = torch.cat([model(ids[:, i:i + 1], cache=cache, input_pos=i) for i in range(30)], 1).float()
        layer.__class__ = torch.nn.Linear  # reference: plain nn.Linear everywhere
        for _, _, linear in Q._linear_layers(model):
            linear.__class__ = torch.nn.Linear
        plain = model(ids).float()
    spread = plain.std()
    assert (fast - plain).abs().max() <= 0.05 * spread
    assert (decode - plain).abs().max() <= 0.05 * spread
    # Training still works on the swapped layers: gradients flow through nn.Linear's own path.
    for _, _, linear in Q._linear_layers(model):
        linear.__class__ = Q.Bf16Linear
    model.train()
    model(ids).float().sum().backward()
    assert layer.weight.grad is not None


def test_quantize_command(tiny_checkpoint, tmp_path, capsys):
    from stablecode.cli import main

    assert main(["quantize", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "q4"),
                 "--method", "int4", "--group-size", "32"]) == 0
    model = load_model(tmp_path / "q4")
    assert model.quantization == {"method": "int4", "group_size": 32}
    assert (tmp_path / "q4" / "tokenizer.json").exists()
    assert main(["quantize", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "bad"),
                 "--method", "int4", "--group-size", "48"]) == 2
    assert "multiple of 32" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method", ["int8", "int4", "bf16"])
def test_prompt_gemm_in_chunks_matches_whole(method, monkeypatch):
    """Prompts dequantize a few output channels at a time; the result is the whole-matrix product."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 80).to(torch.bfloat16)
    if method == "bf16":
        layer = linear
        layer.__class__ = Q.Bf16Linear
    else:
        layer = Q.Int8Linear.from_linear(linear) if method == "int8" else Q.Int4Linear.from_linear(linear, 32)
    x = torch.randn(2, 20, 64).bfloat16()
    expected = F.linear(x.float(), layer.dequantized(), layer.bias.float())
    monkeypatch.setattr(Q, "GEMM_CHUNK_CHANNELS", 32)  # 80 channels: chunks of 32, 32, 16
    monkeypatch.setattr(ops, "native_bf16", lambda: False)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 20, 80)
    assert torch.allclose(y.float(), expected, atol=2e-2, rtol=1e-2)
