"""Model configuration: one dataclass, named presets, and Hugging Face `config.json` in/out."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from stablecode.atomic import atomic_write_text
from stablecode.errors import ConfigError


# Upper bounds, far above any real model of this family (the 3B: 49,152 / 2,560 / 32 / 32 / 10,240 /
# 4,096), checked before anything is allocated: a crafted config.json must fail with a message,
# not by allocating gigabytes (rotary tables grow with the positions) or building 10^9 layers.
LIMITS = {"vocab_size": 1 << 21, "hidden_size": 1 << 16, "num_layers": 1 << 10, "num_heads": 1 << 12,
          "intermediate_size": 1 << 18, "max_position_embeddings": 1 << 20}
# config.json keys whose values must be > 0.
POSITIVE_KEYS = frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "max_position_embeddings", "layer_norm_eps"})


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a GPT-NeoX decoder as StableCode uses it."""

    name: str = "custom"
    vocab_size: int = 49152
    hidden_size: int = 2560
    num_layers: int = 32
    num_heads: int = 32
    intermediate_size: int = 10240
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    max_position_embeddings: int = 4096
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    # The model card describes one LayerNorm feeding both branches; the released weights have two.
    shared_layernorm: bool = False
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 0
    # Trained for fill-in-the-middle (StarCoder's <fim_prefix>/<fim_suffix>/<fim_middle>): the server
    # accepts FIM prompts and `suffix` only for such a model.
    fim: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
            if getattr(self, name) > LIMITS[name]:
                raise ConfigError(f"{name} {getattr(self, name):,} is beyond any model of this family "
                                  f"(stablecode accepts at most {LIMITS[name]:,})")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_dims % 2:
            raise ConfigError(f"rotary dims ({self.rotary_dims}) must be even")
        if self.shared_layernorm and not self.use_parallel_residual:
            raise ConfigError("shared_layernorm needs use_parallel_residual")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dims(self) -> int:
        # Same truncation as GPT-NeoX: int(head_dim * pct).
        return int(self.head_dim * self.rotary_pct)

    @property
    def num_parameters(self) -> int:
        """Exact parameter count of the network built from this config."""
        h, v, f = self.hidden_size, self.vocab_size, self.intermediate_size
        norm = 2 * h
        bias = 1 if self.attention_bias else 0
        attention = h * 3 * h + 3 * h * bias + h * h + h * bias
        mlp = h * f + f + f * h + h
        per_layer = attention + mlp + norm * (1 if self.shared_layernorm else 2)
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + norm + head

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Keys and values of one token in all layers; an int8 cache (1 byte) adds a float32 scale per head."""
        scales = 2 * self.num_layers * self.num_heads * 4 if bytes_per_element == 1 else 0
        return 2 * self.num_layers * self.hidden_size * bytes_per_element + scales

    # ---- presets -------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    # ---- Hugging Face config.json --------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Read a transformers GPTNeoXConfig dict (old `rotary_pct` or new `rope_parameters` form)."""
        model_type = hf.get("model_type")
        if model_type != "gpt_neox":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'gpt_neox'")

        def need(key: str, kind: type):
            if key not in hf:
                raise ConfigError(f"{source}: missing key {key!r}")
            value = hf[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise ConfigError(f"{source}: key {key!r} should be {kind.__name__}, got {value!r}")
            if kind in (int, float) and key in POSITIVE_KEYS and not value > 0:
                raise ConfigError(f"{source}: key {key!r} must be positive, got {value!r}")
            return value

        def optional(key: str, kind: type, default):
            return need(key, kind) if key in hf and hf[key] is not None else default

        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: key 'rope_parameters' should be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only 'default')")
        rotary_pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
        rotary_base = rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
        for key, value in (("rotary_pct", rotary_pct), ("rotary_emb_base", rotary_base)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{source}: key {key!r} should be a number, got {value!r}")
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only exact 'gelu')")
        eos = hf.get("eos_token_id", 0)
        if isinstance(eos, list):
            eos = eos[0] if eos else 0
        try:
            return cls(
                name=str(hf.get("_name_or_path") or hf.get("stablecode_name") or "custom"),
                vocab_size=need("vocab_size", int),
                hidden_size=need("hidden_size", int),
                num_layers=need("num_hidden_layers", int),
                num_heads=need("num_attention_heads", int),
                intermediate_size=need("intermediate_size", int),
                rotary_pct=float(rotary_pct),
                rotary_base=float(rotary_base),
                max_position_embeddings=need("max_position_embeddings", int),
                layer_norm_eps=optional("layer_norm_eps", float, 1e-5),
                use_parallel_residual=optional("use_parallel_residual", bool, True),
                shared_layernorm=optional("stablecode_shared_layernorm", bool, False),
                tie_word_embeddings=optional("tie_word_embeddings", bool, False),
                attention_bias=optional("attention_bias", bool, True),
                bos_token_id=optional("bos_token_id", int, 0),
                eos_token_id=eos if isinstance(eos, int) else 0,
                fim=optional("stablecode_fim", bool, False),
            )
        except ConfigError as e:
            if str(e).startswith(source):
                raise
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict:
        """A config.json that both old (rotary_pct) and new (rope_parameters) transformers load."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "stablecode_name": self.name,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rotary_base,
                                "partial_rotary_factor": self.rotary_pct},
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.use_parallel_residual,
            "stablecode_shared_layernorm": self.shared_layernorm,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "stablecode_fim": self.fim,
        }

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(data, source=str(path))

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        # Exactly the released StableCode-Completion-Alpha-3B-4K checkpoint.
        ModelConfig(name="stablecode-completion-alpha-3b-4k"),
        # The embedded default model's shape (configs/nano/wide-h256.json): same family, trained
        # at hidden 128 (configs/nano/model.json, sized by the sweep in docs/training.md) and then
        # widened twofold (stablecode.train.growth), fill-in-the-middle trained.
        ModelConfig(name="stablecode-nano", vocab_size=8192, hidden_size=256, num_layers=4,
                    num_heads=8, intermediate_size=1024, max_position_embeddings=512, fim=True),
        # Tiny shapes for tests and smoke runs.
        ModelConfig(name="tiny", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                    intermediate_size=256, max_position_embeddings=256),
        ModelConfig(name="tiny-49k", vocab_size=49152, hidden_size=64, num_layers=2, num_heads=4,
                    intermediate_size=256, max_position_embeddings=4096),
    )
}
