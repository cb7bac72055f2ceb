"""config.json in both Hugging Face forms, a config transformers loads, and one clear error per bad key."""

import json

import pytest

from stablecode import PRESETS, ModelConfig
from stablecode.checkpoint import load_config
from stablecode.errors import ConfigError, StablecodeError

transformers = pytest.importorskip("transformers")

# The released StableCode-Completion-Alpha-3B-4K config.json (transformers 4.x form).
RELEASED_3B = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
    "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 10240, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 4096, "model_type": "gpt_neox", "num_attention_heads": 32,
    "num_hidden_layers": 32, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.30.0.dev0", "use_cache": True,
    "use_parallel_residual": True, "vocab_size": 49152,
}

ARCHITECTURE = [f for f in ModelConfig.field_names() if f != "name"]


def write(tmp_path, data) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def test_released_form_reads_as_the_3b_preset(tmp_path):
    config = ModelConfig.from_json_file(write(tmp_path, RELEASED_3B))
    preset = PRESETS["stablecode-completion-alpha-3b-4k"]
    assert {f: getattr(config, f) for f in ARCHITECTURE} == {f: getattr(preset, f) for f in ARCHITECTURE}
    assert config.num_parameters == 2_769_310_720


def test_transformers5_rope_parameters_form(tmp_path):
    """What transformers 5 itself writes: rope_parameters, no rotary_pct / rotary_emb_base."""
    hf = transformers.GPTNeoXConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    intermediate_size=96, max_position_embeddings=128, use_parallel_residual=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                     "partial_rotary_factor": 0.5},
                                    tie_word_embeddings=True, layer_norm_eps=1e-6)
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rotary_pct" not in written
    config = ModelConfig.from_json_file(tmp_path / "config.json")
    assert (config.rotary_pct, config.rotary_base, config.rotary_dims) == (0.5, 500.0, 8)
    assert (config.num_layers, config.num_heads, config.intermediate_size) == (3, 4, 96)
    assert config.use_parallel_residual is False and config.tie_word_embeddings is True
    assert config.layer_norm_eps == 1e-6


def test_transformers_loads_what_we_write(tmp_path):
    ours = ModelConfig(vocab_size=300, hidden_size=96, num_layers=3, num_heads=3, intermediate_size=200,
                       rotary_pct=0.5, rotary_base=2000.0, max_position_embeddings=64, layer_norm_eps=1e-6,
                       use_parallel_residual=False, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    ours.save(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    # Old transformers read rotary_pct / rotary_emb_base, transformers 5 reads rope_parameters: both present.
    assert (written["rotary_pct"], written["rotary_emb_base"]) == (0.5, 2000.0)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "GPTNeoXConfig"
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.intermediate_size) == (96, 3, 3, 200)
    assert hf.rope_parameters["partial_rotary_factor"] == 0.5 and hf.rope_parameters["rope_theta"] == 2000.0
    assert (hf.vocab_size, hf.max_position_embeddings, hf.layer_norm_eps) == (300, 64, 1e-6)
    assert hf.use_parallel_residual is False and hf.tie_word_embeddings is True
    assert (hf.bos_token_id, hf.eos_token_id, hf.hidden_act) == (1, 2, "gelu")
    # The rotary width transformers builds from it is ours: rotary_dims / 2 inverse frequencies.
    model = transformers.GPTNeoXForCausalLM(hf)
    assert model.gpt_neox.rotary_emb.inv_freq.numel() == ours.rotary_dims // 2
    assert ModelConfig.from_json_file(tmp_path / "config.json") == ours


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    config = PRESETS[name]
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="tiny"):
        ModelConfig.from_preset("nope")


@pytest.mark.parametrize("change, key", [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),             # removed below
    ({"num_hidden_layers": "32"}, "num_hidden_layers"),
    ({"vocab_size": 491.5}, "vocab_size"),
    ({"use_parallel_residual": "yes"}, "use_parallel_residual"),
    ({"rotary_pct": "a quarter"}, "rotary_pct"),
    ({"rotary_pct": 1.5}, "rotary_pct"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"layer_norm_eps": -1.0}, "layer_norm_eps"),
    ({"num_attention_heads": 3}, "hidden_size"),        # 2560 is not divisible by 3
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope"),
])
def test_bad_key_is_one_error_naming_file_and_key(tmp_path, change, key):
    data = {**RELEASED_3B, **change}
    if change.get("hidden_size", 0) is None:
        del data["hidden_size"]
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_json_file(path)
    message = str(error.value)
    assert str(path) in message and key in message
    assert "\n" not in message


def test_missing_key_is_named(tmp_path):
    data = dict(RELEASED_3B)
    del data["intermediate_size"]
    with pytest.raises(ConfigError, match=r"config\.json: missing key 'intermediate_size'"):
        ModelConfig.from_json_file(write(tmp_path, data))


def test_unreadable_files(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_json_file(path)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json_file(tmp_path / "absent.json")


def test_checkpoint_config_errors_are_user_errors(tmp_path):
    """load_config reports the same message as a StablecodeError (the CLI prints it in one line)."""
    write(tmp_path, {**RELEASED_3B, "model_type": "bert"})
    with pytest.raises(StablecodeError, match="model_type"):
        load_config(tmp_path)
    with pytest.raises(StablecodeError, match="config.json not found"):
        load_config(tmp_path / "empty")


def test_derived_sizes():
    config = PRESETS["stablecode-completion-alpha-3b-4k"]
    assert (config.head_dim, config.rotary_dims) == (80, 20)
    # The card's variant with one LayerNorm per layer has 2 * hidden fewer parameters per layer.
    shared = config.replace(shared_layernorm=True)
    assert config.num_parameters - shared.num_parameters == 32 * 2 * 2560
    with pytest.raises(ConfigError, match="parallel"):
        config.replace(shared_layernorm=True, use_parallel_residual=False)


def test_the_nano_preset_is_the_shipped_embedded_model():
    from stablecode.registry import EMBEDDED_MODELS_DIR

    shipped = ModelConfig.from_json_file(EMBEDDED_MODELS_DIR / "stablecode-nano" / "config.json")
    assert ModelConfig.from_preset("stablecode-nano") == shipped
    from pathlib import Path

    configs = Path(__file__).parents[1] / "configs" / "nano"
    first = ModelConfig.from_json_file(configs / "model.json")  # the recipe's first stages
    widened = ModelConfig.from_json_file(configs / "wide-h256.json")  # its last, widened from those
    assert (first.hidden_size, first.num_layers, first.vocab_size) == (128, 4, 8192)
    assert (widened.hidden_size, widened.num_heads, widened.intermediate_size, widened.num_layers,
            widened.vocab_size) == (shipped.hidden_size, shipped.num_heads, shipped.intermediate_size,
                                    shipped.num_layers, shipped.vocab_size) == (256, 8, 1024, 4, 8192)
