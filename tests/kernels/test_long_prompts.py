"""Long prompts: prefill in chunks gives the logits of one full pass, and every chunk's attention runs
on SDPA's flash kernel (restricted to it here, so a fallback to the math path, which materialises
the [queries, keys] score matrix, would fail the test)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from stablecode import GPTNeoX, ModelConfig
from stablecode.kv_cache import KVCache
from stablecode.model import init_weights

CONFIG = ModelConfig(name="long-prompt-test", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                     intermediate_size=256, max_position_embeddings=512)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = GPTNeoX(CONFIG)
    init_weights(model, torch.Generator().manual_seed(0))
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row_positions", [False, True])
def test_chunked_prefill_matches_one_pass_on_the_flash_kernel(model, dtype, per_row_positions):
    model = model.to(dtype)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1))
    chunk = 128
    with torch.inference_mode(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        whole = model(ids)[0, -1].float()
        cache = KVCache.for_model(model, 2, 320)
        for start in range(0, ids.shape[1], chunk):
            part = ids[:, start:start + chunk]
            # The engine's form: positions per row and the cache row; the benchmark's: an int start.
            position = (torch.arange(start, start + part.shape[1])[None] if per_row_positions else start)
            rows = torch.tensor([1]) if per_row_positions else None
            logits = model(part, cache=cache, input_pos=position, cache_rows=rows,
                           logit_positions=torch.tensor([[part.shape[1] - 1]]))[0, -1].float()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert (logits - whole).abs().max() / whole.abs().max() < tolerance
