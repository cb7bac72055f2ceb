"""The network matches transformers' GPTNeoXForCausalLM on the same weights."""

import pytest
import torch

from stablecode import GPTNeoX, ModelConfig
from stablecode.checkpoint import hf_state_dict
from stablecode.kv_cache import KVCache
from stablecode.model import init_weights

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "parallel-rot25": ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                                  max_position_embeddings=128),
    "sequential-rot100": ModelConfig(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128,
                                     max_position_embeddings=128, use_parallel_residual=False, rotary_pct=1.0),
    "tied-rot25-base500": ModelConfig(vocab_size=300, hidden_size=96, num_layers=2, num_heads=3, intermediate_size=192,
                                      max_position_embeddings=128, tie_word_embeddings=True, rotary_base=500.0),
    "shared-norm": ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                               max_position_embeddings=128, shared_layernorm=True),
}


def random_model(config: ModelConfig, seed: int = 0) -> GPTNeoX:
    torch.manual_seed(seed)
    model = GPTNeoX(config)
    init_weights(model)
    with torch.no_grad():  # non-trivial norms and biases so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def reference_model(model: GPTNeoX):
    hf_config = transformers.GPTNeoXConfig(**model.config.to_hf_dict())
    reference = transformers.GPTNeoXForCausalLM(hf_config).eval()
    head = "lm_head.weight" if hasattr(reference, "lm_head") else "embed_out.weight"  # transformers 5 renamed it
    state = {head if k == "embed_out.weight" else k: v for k, v in hf_state_dict(model).items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m or "masked_bias" in m or m.endswith("attention.bias") or
                                  (model.config.tie_word_embeddings and m == head) for m in missing)
    if model.config.tie_word_embeddings:
        reference.tie_weights()
    return reference


def to_bf16(reference):
    """Cast transformers' model to bf16 but keep its rotary frequencies fp32, as from_pretrained does."""
    inv_freq = reference.gpt_neox.rotary_emb.inv_freq.clone()
    reference = reference.to(torch.bfloat16)
    reference.gpt_neox.rotary_emb.inv_freq = inv_freq
    return reference


@pytest.mark.parametrize("name", CONFIGS)
def test_fp32_logits_match_transformers(name):
    model = random_model(CONFIGS[name])
    reference = reference_model(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 37))
    with torch.no_grad():
        ours = model(ids)
        theirs = reference(ids).logits
    assert ours.shape == (2, 37, model.config.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["parallel-rot25", "sequential-rot100"])
def test_bf16_argmax_agrees_with_transformers(name):
    model = random_model(CONFIGS[name])
    reference = to_bf16(reference_model(model))
    ids = torch.randint(0, model.config.vocab_size, (4, 64))
    with torch.no_grad():
        exact = model(ids)
        model = model.to(torch.bfloat16)
        ours = model(ids).float()
        theirs = reference(ids).logits.float()
    # Our bf16 model picks the fp32 model's token as often as transformers' bf16 does (where two bf16
    # implementations round differently they may split near-ties differently: both are as right).
    def agreement(logits):
        return (logits.argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert agreement(ours) >= agreement(theirs) - 0.01 and agreement(ours) >= 0.95
    # Our bf16 rounding error is of the same size as transformers' own.
    assert (ours - exact).abs().max() <= 1.5 * (theirs - exact).abs().max()


def test_cached_decoding_equals_full_forward():
    model = random_model(CONFIGS["parallel-rot25"])
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 2, 32, dtype=torch.float32)
        prefix = model(ids[:, :12], cache=cache, input_pos=0)
        chunk = model(ids[:, 12:15], cache=cache, input_pos=12)  # several tokens after a prefix (speculation, reuse)
        steps = [model(ids[:, t:t + 1], cache=cache, input_pos=t) for t in range(15, 20)]
    stepped = torch.cat([prefix, chunk, *steps], dim=1)
    assert (stepped - full).abs().max().item() <= 1e-5


def test_per_row_positions_and_cache_rows():
    """Rows at different positions decode in one batch, each seeing only its own past."""
    model = random_model(CONFIGS["sequential-rot100"])
    a = torch.randint(0, 300, (1, 9))
    b = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        cache = KVCache.for_model(model, 3, 16, dtype=torch.float32)
        model(a[:, :8], cache=cache, input_pos=torch.arange(8)[None], cache_rows=torch.tensor([2]))
        model(b[:, :4], cache=cache, input_pos=torch.arange(4)[None], cache_rows=torch.tensor([0]))
        step = model(torch.cat([a[:, 8:], b[:, 4:]]), cache=cache, input_pos=torch.tensor([[8], [4]]),
                     cache_rows=torch.tensor([2, 0]))
    assert (step[0, 0] - full_a[0, 8]).abs().max().item() <= 1e-5
    assert (step[1, 0] - full_b[0, 4]).abs().max().item() <= 1e-5


def test_positions_past_context_are_refused():
    model = random_model(CONFIGS["parallel-rot25"])
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_parameter_count_of_the_3b_preset():
    config = ModelConfig.from_preset("stablecode-completion-alpha-3b-4k")
    assert config.num_parameters == 2_769_310_720
    assert config.rotary_dims == 20 and config.head_dim == 80
    assert config.kv_cache_bytes_per_token(2) == 327_680
    with torch.device("meta"):
        model = GPTNeoX(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters
