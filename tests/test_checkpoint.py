"""Checkpoints in Hugging Face layout: what transformers writes we load, what we write transformers loads,
and every broken checkpoint is one actionable error."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stablecode import GPTNeoX, ModelConfig, load_model, save_checkpoint
from stablecode.checkpoint import hf_state_dict
from stablecode.errors import CheckpointError, StablecodeError
from stablecode.model import init_weights

transformers = pytest.importorskip("transformers")

CONFIG = ModelConfig(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                     max_position_embeddings=64)
IDS = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(3))


def random_model(config: ModelConfig = CONFIG, seed: int = 0) -> GPTNeoX:
    torch.manual_seed(seed)
    model = GPTNeoX(config)
    init_weights(model)
    with torch.no_grad():  # non-zero norms and biases, so a tensor loaded in the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def transformers_model(seed: int = 0, config: ModelConfig = CONFIG):
    torch.manual_seed(seed)
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf_dict())).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.1)
    return hf


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Our random model saved single-file; reused (copied) by the error tests."""
    model = random_model()
    directory = save_checkpoint(model, tmp_path_factory.mktemp("saved") / "model")
    return directory, logits_of(model)


def copy_of(saved, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(saved[0], target)
    return target


# ---- what transformers wrote, we load --------------------------------------------------------

@pytest.mark.parametrize("shard", [None, "20KB"])
def test_load_what_transformers_saved(tmp_path, shard):
    reference = transformers_model()
    kwargs = {"max_shard_size": shard} if shard else {}
    reference.save_pretrained(tmp_path, **kwargs)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    ours = load_model(tmp_path)
    assert (logits_of(ours) - logits_of(reference)).abs().max().item() <= 1e-5


def test_head_names_transformers_uses(tmp_path):
    """save_pretrained writes the released name `embed_out`; a raw transformers 5 state_dict says `lm_head`."""
    reference = transformers_model(seed=1)
    reference.save_pretrained(tmp_path / "saved")
    assert "embed_out.weight" in load_file(tmp_path / "saved" / "model.safetensors")
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", raw)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert "lm_head.weight" in state or "embed_out.weight" in state
    save_file(state, raw / "model.safetensors")
    assert (logits_of(load_model(raw)) - logits_of(reference)).abs().max().item() <= 1e-5


def test_weights_only_bin_with_old_buffers(tmp_path):
    """pytorch_model.bin with the buffers old GPT-NeoX checkpoints carry (skipped), zip and legacy formats."""
    model = random_model(seed=2)
    state = hf_state_dict(model)
    for i in range(CONFIG.num_layers):
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    model.config.save(tmp_path / "config.json")
    for legacy in (False, True):
        torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        assert (logits_of(load_model(tmp_path)) - logits_of(model)).abs().max().item() == 0


def test_sharded_bin_with_index(tmp_path):
    model = random_model(seed=3)
    state = hf_state_dict(model)
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
        weight_map.update({k: file for k in keys})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model.config.save(tmp_path / "config.json")
    assert (logits_of(load_model(tmp_path)) - logits_of(model)).abs().max().item() == 0


class Exploit:
    """Unpickling this would run code: it must be refused, not executed."""

    marker: Path

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_bin_with_pickled_object_is_refused_not_executed(tmp_path):
    model = random_model()
    model.config.save(tmp_path / "config.json")
    Exploit.marker = tmp_path / "executed"
    state = dict(hf_state_dict(model))
    state["payload"] = Exploit()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(tmp_path)
    assert not Exploit.marker.exists()


# ---- what we wrote, transformers loads -------------------------------------------------------

@pytest.mark.parametrize("max_shard_size", [None, 30_000])
def test_transformers_loads_what_we_save(tmp_path, max_shard_size):
    model = random_model(seed=4)
    save_checkpoint(model, tmp_path / "ours", max_shard_size=max_shard_size)
    if max_shard_size:
        index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 3
    reference, info = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (logits_of(reference.eval()) - logits_of(model)).abs().max().item() <= 1e-5
    # ... and so do we, from either layout.
    assert (logits_of(load_model(tmp_path / "ours")) - logits_of(model)).abs().max().item() == 0


def test_tied_and_shared_norm_round_trip(tmp_path):
    for config in (CONFIG.replace(tie_word_embeddings=True), CONFIG.replace(shared_layernorm=True)):
        model = random_model(config)
        save_checkpoint(model, tmp_path / "m")
        loaded = load_model(tmp_path / "m")
        assert (logits_of(loaded) - logits_of(model)).abs().max().item() == 0
        if config.tie_word_embeddings:
            assert loaded.embed_out.weight is loaded.gpt_neox.embed_in.weight


def test_dtypes(tmp_path):
    model = random_model()
    save_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path / "bf16").embed_out.weight.dtype == torch.bfloat16  # as stored by default
    upcast = load_model(tmp_path / "bf16", dtype="float32")
    assert all(p.dtype == torch.float32 for p in upcast.parameters())
    assert load_model(tmp_path / "bf16", dtype=torch.float16).embed_out.weight.dtype == torch.float16


def test_save_replaces_atomically_and_a_failed_save_loses_nothing(tmp_path, saved):
    target = copy_of(saved, tmp_path)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(FileNotFoundError):
        save_checkpoint(random_model(seed=9), target, tokenizer_file=tmp_path / "no-such-tokenizer.json")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no staging directory left behind
    other = random_model(seed=9)
    save_checkpoint(other, target)
    assert (logits_of(load_model(target)) - logits_of(other)).abs().max().item() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


# ---- every error of a broken checkpoint is one actionable message ----------------------------

def error_of(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as error:
        load_model(path, **kwargs)
    assert isinstance(error.value, StablecodeError)
    return str(error.value)


def test_missing_files(tmp_path, saved):
    assert "no such checkpoint directory" in error_of(tmp_path / "absent")
    target = copy_of(saved, tmp_path)
    (target / "model.safetensors").unlink()
    assert "no weights found" in error_of(target)
    (target / "config.json").unlink()
    assert "config.json not found" in error_of(target)


def test_index_naming_a_missing_shard(tmp_path):
    save_checkpoint(random_model(), tmp_path / "m", max_shard_size=30_000)
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    shard.unlink()
    assert f"names shard files that do not exist: {shard}" in error_of(tmp_path / "m")


def test_missing_and_unexpected_tensors_are_listed(tmp_path, saved):
    target = copy_of(saved, tmp_path)
    state = load_file(target / "model.safetensors")
    del state["gpt_neox.layers.1.mlp.dense_h_to_4h.bias"]
    del state["embed_out.weight"]
    state["gpt_neox.layers.7.attention.extra.weight"] = torch.zeros(2)
    save_file(state, target / "model.safetensors")
    message = error_of(target)
    assert "missing tensors (2): embed_out.weight, gpt_neox.layers.1.mlp.dense_h_to_4h.bias" in message
    assert "unexpected tensors (1): gpt_neox.layers.7.attention.extra.weight" in message


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, saved):
    target = copy_of(saved, tmp_path)
    state = load_file(target / "model.safetensors")
    state["gpt_neox.layers.0.attention.dense.weight"] = torch.zeros(64, 32)
    save_file(state, target / "model.safetensors")
    message = error_of(target)
    assert "gpt_neox.layers.0.attention.dense.weight: expected (64, 64), found (64, 32)" in message
    assert "missing" not in message  # the tensor is there, just the wrong shape

    # The usual cause: a config.json that is not this checkpoint's.
    target = copy_of(saved, tmp_path / "b")
    config = json.loads((target / "config.json").read_text())
    config["intermediate_size"] = 256
    (target / "config.json").write_text(json.dumps(config))
    assert "dense_h_to_4h.weight: expected (256, 64), found (128, 64)" in error_of(target)


def test_truncated_safetensors(tmp_path, saved):
    target = copy_of(saved, tmp_path)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    message = error_of(target)
    assert "model.safetensors" in message and "truncated" in message


@pytest.mark.parametrize("damage", ["header-json", "header-length", "empty"])
def test_corrupted_safetensors_header(tmp_path, saved, damage):
    target = copy_of(saved, tmp_path)
    data = bytearray((target / "model.safetensors").read_bytes())
    if damage == "header-json":
        data[8:20] = b"#" * 12
    elif damage == "header-length":
        data[:8] = (2 ** 40).to_bytes(8, "little")
    else:
        data = b""
    (target / "model.safetensors").write_bytes(bytes(data))
    message = error_of(target)
    assert "model.safetensors" in message and "corrupted" in message


def test_bad_shard_index(tmp_path):
    save_checkpoint(random_model(), tmp_path / "m", max_shard_size=30_000)
    (tmp_path / "m" / "model.safetensors.index.json").write_text("{}")
    assert "not a valid shard index" in error_of(tmp_path / "m")


def test_dtype_or_device_that_cannot_run(saved):
    assert "float64 is not supported" in error_of(saved[0], dtype=torch.float64)
    assert "unknown dtype 'int3'" in error_of(saved[0], dtype="int3")
    assert "not supported" in error_of(saved[0], device="mps")
    assert "invalid device" in error_of(saved[0], device="gpu:zero")
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in error_of(saved[0], device="cuda")


def test_embedded_default_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    from stablecode import registry

    monkeypatch.setattr(registry, "EMBEDDED_MODELS_DIR", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert "--model DIR" in error_of(None)


# ---- hostile checkpoints: refused before anything is allocated, never a hang ------------------

def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", ["max_position_embeddings", "num_hidden_layers", "vocab_size", "hidden_size",
                                 "intermediate_size"])
def test_absurd_sizes_are_refused_before_allocating(tmp_path, saved, key):
    target = copy_of(saved, tmp_path)
    edit_config(target, **{key: 1_000_000_000})
    assert "1,000,000,000 is beyond any model of this family" in error_of(target)


@pytest.mark.timeout(60)
def test_a_config_far_larger_than_its_weights_is_refused(tmp_path, saved):
    target = copy_of(saved, tmp_path)
    edit_config(target, num_hidden_layers=1000, hidden_size=4096, num_attention_heads=32)  # within the limits
    message = error_of(target)
    assert "describes" in message and "parameters" in message and "does not belong to these weights" in message


def test_nan_and_inf_weights_warn(tmp_path):
    model = random_model()
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_h_to_4h.weight[3, 5] = float("nan")
        model.embed_out.weight[0, 0] = float("inf")
    save_checkpoint(model, tmp_path / "m")
    with pytest.warns(UserWarning, match=r"2 weight tensors hold NaN or Inf values \(.*dense_h_to_4h"):
        load_model(tmp_path / "m")


def test_nan_warning_is_one_line_on_the_command_line(tmp_path, byte_tokenizer_file):
    import subprocess
    import sys

    model = random_model(ModelConfig.from_preset("tiny"))
    with torch.no_grad():
        model.embed_out.weight[0, 0] = float("nan")
    save_checkpoint(model, tmp_path / "m", tokenizer_file=byte_tokenizer_file)
    result = subprocess.run([sys.executable, "-m", "stablecode.cli", "complete", "--model", str(tmp_path / "m"),
                             "--max-new-tokens", "2", "x"], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stablecode: warning:") and "NaN or Inf" in lines[0], result.stderr


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_integer_or_bool_weights_are_refused_in_a_float_checkpoint(tmp_path, saved, dtype):
    target = copy_of(saved, tmp_path)
    state = load_file(target / "model.safetensors")
    name = "gpt_neox.layers.0.attention.dense.weight"
    state[name] = (state[name] * 100).to(dtype)
    save_file(state, str(target / "model.safetensors"))
    message = error_of(target)
    assert name in message and str(dtype).removeprefix("torch.") in message and "quantized" in message


@pytest.mark.parametrize("weight_map, fragment", [
    ({"embed_out.weight": "../outside.safetensors"}, "outside the checkpoint directory"),
    ({"embed_out.weight": "/etc/passwd"}, "outside the checkpoint directory"),
    ({"embed_out.weight": 7}, "not a file name"),
    ([], "weight_map should be a non-empty object"),
    ({"embed_out.weight": "absent.safetensors"}, "names shard files that do not exist"),
])
def test_crafted_shard_indexes_are_clear_errors(tmp_path, saved, weight_map, fragment):
    target = copy_of(saved, tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((target / "model.safetensors").read_bytes())
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert fragment in error_of(target)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "model.safetensors.index.json"])
def test_a_fifo_in_the_model_directory_is_an_error_not_a_hang(tmp_path, saved, byte_tokenizer_file, name):
    import os

    from stablecode import load_tokenizer
    from stablecode.errors import TokenizerError

    target = copy_of(saved, tmp_path)
    shutil.copyfile(byte_tokenizer_file, target / "tokenizer.json")
    (target / name).unlink(missing_ok=True)
    os.mkfifo(target / name)
    if name == "tokenizer.json":
        with pytest.raises(TokenizerError, match="FIFO"):
            load_tokenizer(target)
    else:
        assert "FIFO" in error_of(target)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_load(tmp_path, saved, byte_tokenizer_file):
    from stablecode import Completer
    from stablecode.errors import TokenizerError

    from stablecode import load_tokenizer

    target = copy_of(saved, tmp_path)  # vocabulary 320; the byte tokenizer has more tokens
    shutil.copyfile(byte_tokenizer_file, target / "tokenizer.json")
    size = load_tokenizer(target).vocab_size
    assert size > 320
    with pytest.raises(TokenizerError, match=f"{size} tokens but the model's vocabulary is 320"):
        Completer(target)
