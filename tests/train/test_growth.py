"""Widening a trained model: the wider model computes what the narrow one did, and a run starts from it."""

import json
import re

import pytest
import torch

from stablecode.config import PRESETS
from stablecode.errors import StablecodeError
from stablecode.model import GPTNeoX, init_weights
from stablecode.train import train
from stablecode.train.growth import widen, width_factor

NARROW = PRESETS["tiny"]


def wider(k: int):
    return NARROW.replace(hidden_size=k * NARROW.hidden_size, num_heads=k * NARROW.num_heads,
                          intermediate_size=k * NARROW.intermediate_size)


def trained_looking(config):
    """Random weights with non-trivial norms and biases, so nothing passes by being zero or one."""
    model = GPTNeoX(config)
    init_weights(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return model.eval()


@pytest.mark.parametrize("k", [2, 3])
def test_the_widened_model_gives_the_narrow_models_logits(k):
    narrow = trained_looking(NARROW)
    wide = GPTNeoX(wider(k)).eval()
    wide.load_state_dict(widen(narrow.state_dict(), NARROW, wider(k)))
    tokens = torch.randint(0, NARROW.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = narrow(tokens), wide(tokens)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_the_copies_of_a_unit_start_different_so_they_can_learn_different_things():
    narrow = trained_looking(NARROW)
    weights = widen(narrow.state_dict(), NARROW, wider(2))
    up = weights["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"]  # [2·I, 2·H]
    first, second = up[:NARROW.intermediate_size], up[NARROW.intermediate_size:]
    assert not torch.equal(first, second)
    # …while each copy still sums its split inputs back to the original unit
    original = narrow.state_dict()["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"]
    halves = first[:, :NARROW.hidden_size] + first[:, NARROW.hidden_size:]
    assert torch.allclose(halves, original, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 96, "num_heads": 4}, "not an integer multiple"),
    ({"num_layers": 3}, "num_layers 3 (needs 2)"),
    ({"num_heads": 4}, "num_heads 4 (needs 8)"),
    ({"vocab_size": 1024}, "vocab_size 1024 (needs 512)"),
])
def test_widening_refuses_shapes_it_cannot_preserve(change, message):
    with pytest.raises(StablecodeError, match=re.escape(message)):
        width_factor(NARROW, wider(2).replace(**change))


def test_a_wider_run_started_from_a_narrow_export_begins_at_the_narrow_models_loss(config_for, packed, tmp_path):
    narrow_run = tmp_path / "narrow"
    train(config_for(packed, narrow_run, max_steps=4), progress=False)
    exported = narrow_run / "final"
    wide_model = tmp_path / "wide.json"
    wide_model.write_text(json.dumps(json.loads((exported / "config.json").read_text())
                                     | {"hidden_size": 128, "num_attention_heads": 8, "intermediate_size": 512}))
    # lr 0: the first logged loss is the starting weights' loss
    same = train(config_for(packed, tmp_path / "same", max_steps=1, lr=0.0, init_from=str(exported)), progress=False)
    wide = train(config_for(packed, tmp_path / "wide", max_steps=1, lr=0.0, init_from=str(exported),
                            model=str(wide_model)), progress=False)
    scratch = train(config_for(packed, tmp_path / "scratch", max_steps=1, lr=0.0, model=str(wide_model)),
                    progress=False)
    assert wide["loss"][0] == pytest.approx(same["loss"][0], abs=1e-3)
    assert wide["loss"][0] < scratch["loss"][0] - 0.5
