"""The engine through Completer: greedy parity with transformers, batching, seeds, stop strings,
streaming, EOS and special tokens, context truncation, max_new_tokens."""

import pytest
import torch

from stablecode import Completer, load_tokenizer
from stablecode.inference.request import Request
from stablecode.inference.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

PROMPTS = ["def add(a, b):\n", "for i in range(10):\n    print(", "class Foo:\n    def __init__(self):\n        self.",
           "x"]


@pytest.fixture(scope="module")
def completer(tiny_checkpoint):
    return Completer(tiny_checkpoint)


@pytest.fixture(scope="module")
def tokenizer(byte_tokenizer_file):
    return load_tokenizer(byte_tokenizer_file)


# ---- with a model -------------------------------------------------------------------------------

def test_greedy_equals_transformers_generate(completer, tiny_checkpoint):
    reference = transformers.GPTNeoXForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ours = completer.complete(prompt, max_new_tokens=24, token_healing=False)
        ids = torch.tensor([completer.tokenizer.encode(prompt)])
        with torch.no_grad():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                     eos_token_id=0, pad_token_id=0)
        theirs = out[0, ids.shape[1]:].tolist()
        assert ours.token_ids == theirs
        assert ours.completion_tokens >= 20 and ours.prompt_tokens == ids.shape[1]


def test_token_healing_rechooses_the_last_prompt_token_and_shows_what_follows_it(completer):
    tokenizer = completer.tokenizer
    healed_prompts = 0
    for prompt in PROMPTS + ["x = 1\n", "for i in range(10):\n"]:
        ids = tokenizer.encode(prompt)
        given_back = completer.request(prompt).healed_text
        if not given_back:  # one token, or no other token starts with the last one's text
            continue
        healed_prompts += 1
        assert given_back == tokenizer.token_text(ids[-1])
        healed = completer.complete(prompt, max_new_tokens=24)
        assert healed.prompt_tokens == len(ids) - 1 and healed.completion_tokens == 24
        assert tokenizer.token_text(healed.token_ids[0]).startswith(given_back)
        assert prompt + healed.text == tokenizer.decode(ids[:-1] + healed.token_ids)
    assert healed_prompts >= 2


def test_batch_of_different_lengths_equals_each_alone(completer):
    alone = [completer.complete(p, max_new_tokens=20) for p in PROMPTS]
    batched = completer.complete_batch(PROMPTS, max_new_tokens=20)
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert len({len(completer.tokenizer.encode(p)) for p in PROMPTS}) == len(PROMPTS)


def test_rows_that_finish_early_leave_the_batch(completer):
    """Different max_new_tokens per row: rows drop out and the others go on unchanged."""
    sequences = [completer.request(p, max_new_tokens=n) for p, n in zip(PROMPTS, (3, 17, 9, 25))]
    for _ in completer.generate(sequences):
        pass
    for sequence, prompt, n in zip(sequences, PROMPTS, (3, 17, 9, 25)):
        assert sequence.result().token_ids == completer.complete(prompt, max_new_tokens=n).token_ids


def test_same_seed_same_output_different_seed_differs(completer):
    options = dict(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.95)
    first = completer.complete(PROMPTS[0], seed=7, **options)
    assert completer.complete(PROMPTS[0], seed=7, **options).token_ids == first.token_ids
    assert completer.complete(PROMPTS[0], seed=8, **options).token_ids != first.token_ids
    # In a batch, prompt k uses seed + k: the same draws as alone.
    batch = completer.complete_batch([PROMPTS[0], PROMPTS[0]], seed=7, **options)
    assert batch[0].token_ids == first.token_ids
    assert batch[1].token_ids == completer.complete(PROMPTS[0], seed=8, **options).token_ids


def token_boundaries(tokenizer, ids) -> list[int]:
    """Character offsets in the decoded text where one token ends and the next begins."""
    return [len(tokenizer.decode(ids[:n])) for n in range(1, len(ids))]


def test_stop_string_across_tokens(completer):
    full = completer.complete(PROMPTS[1], max_new_tokens=40)
    text = full.text
    # A stop string made of the 2 characters each side of a token boundary spans two or more tokens.
    boundary = next(b for b in token_boundaries(completer.tokenizer, full.token_ids)
                    if 4 <= b <= len(text) - 2 and text[b - 2:b + 2].isprintable() and "\ufffd" not in text[b - 2:b + 2])
    stop = text[boundary - 2:boundary + 2]
    expected = text[:text.find(stop)]
    result = completer.complete(PROMPTS[1], max_new_tokens=40, stop=["never appears", stop])
    assert result.text == expected and result.finish_reason == "stop"
    pieces = list(completer.stream(PROMPTS[1], max_new_tokens=40, stop=[stop]))
    assert "".join(pieces) == expected  # nothing of the stop string was ever streamed


def test_stream_joins_to_complete(completer):
    for prompt in PROMPTS:
        pieces = list(completer.stream(prompt, max_new_tokens=30))
        result = completer.complete(prompt, max_new_tokens=30)
        assert "".join(pieces) == result.text
        assert all(pieces)  # no empty pieces
        # Streaming token by token neither dropped nor repeated anything of the whole decode (the
        # first token re-chose the prompt's last one, token healing, whose text the prompt has).
        ran = completer.request(prompt).prompt_ids
        assert prompt + result.text == completer.tokenizer.decode(ran + result.token_ids)


def test_max_new_tokens_is_respected(completer):
    for n in (1, 7):
        result = completer.complete(PROMPTS[0], max_new_tokens=n)
        assert result.completion_tokens == n and result.finish_reason == "length"
    zero = completer.complete(PROMPTS[0], max_new_tokens=0)
    assert zero.completion_tokens == 0 and zero.text == "" and zero.finish_reason == "length"


def test_long_prompt_keeps_its_end_and_reports_the_cut(completer):
    context = completer.config.max_position_embeddings  # 256 for the tiny preset
    prompt = "".join(f"value_{i} = {i} * 2\n" for i in range(60))
    ids = completer.tokenizer.encode(prompt)
    assert len(ids) > context
    result = completer.complete(prompt, max_new_tokens=16)
    assert result.truncated_prompt_tokens == len(ids) - (context - 16)
    assert result.prompt_tokens == context - 17 and result.completion_tokens == 16  # one token healed
    # Exactly what completing the kept (most recent) tokens alone gives.
    kept = Request(ids[result.truncated_prompt_tokens:], completer.tokenizer, context, max_new_tokens=16,
                   token_healing=True)
    for _ in completer.generate([kept]):
        pass
    assert kept.result().token_ids == result.token_ids
    # More new tokens than the whole context: still no failure, the output fills the context.
    huge = completer.complete(prompt, max_new_tokens=10_000)
    assert huge.prompt_tokens + huge.completion_tokens <= context
    assert huge.truncated_prompt_tokens == len(ids) - huge.prompt_tokens


def test_empty_prompt_starts_from_end_of_text(completer):
    result = completer.complete("", max_new_tokens=5)
    assert result.prompt_tokens == 1 and result.completion_tokens == 5


def head_that_always_picks(completer_dir, token_id: int) -> Completer:
    """A model whose logits are highest for token_id at every position."""
    completer = Completer(completer_dir)
    with torch.no_grad():
        completer.model.gpt_neox.final_layer_norm.weight.zero_()
        completer.model.gpt_neox.final_layer_norm.bias.fill_(1.0)
        completer.model.embed_out.weight.zero_()
        completer.model.embed_out.weight[token_id] = 1.0
    return completer


def test_eos_stops(tiny_checkpoint):
    completer = head_that_always_picks(tiny_checkpoint, 0)
    result = completer.complete("def f():", max_new_tokens=20)
    assert (result.text, result.completion_tokens, result.finish_reason) == ("", 1, "stop")


def test_special_tokens_never_appear_in_text(tiny_checkpoint, tokenizer):
    fim_prefix = tokenizer.backend.token_to_id("<fim_prefix>")
    completer = head_that_always_picks(tiny_checkpoint, fim_prefix)
    result = completer.complete("def f():", max_new_tokens=6)
    assert result.token_ids == [fim_prefix] * 6 and result.text == "" and result.finish_reason == "length"
    assert list(completer.stream("def f():", max_new_tokens=6)) == []


def test_sampling_params_reach_the_sampler(completer):
    """top_k=1 is greedy whatever the temperature; repetition penalty changes greedy output."""
    greedy = completer.complete(PROMPTS[2], max_new_tokens=20)
    assert completer.complete(PROMPTS[2], max_new_tokens=20, temperature=1.5, top_k=1, seed=3).token_ids \
        == greedy.token_ids
    penalised = completer.complete(PROMPTS[2], max_new_tokens=20, repetition_penalty=5.0)
    assert penalised.token_ids != greedy.token_ids
    with pytest.raises(ValueError):
        completer.complete(PROMPTS[2], temperature=-1)
    assert SamplingParams(temperature=0).greedy


def test_seeds_are_reproducible_whatever_the_batch_companions(completer):
    options = dict(max_new_tokens=25, temperature=0.9, top_k=40, seed=11)
    alone = completer.complete(PROMPTS[2], **options).token_ids
    for companions in ([PROMPTS[0]], PROMPTS[:2] + [PROMPTS[3]]):
        requests = [completer.request(p, max_new_tokens=30, temperature=0.7, seed=99) for p in companions]
        mine = completer.request(PROMPTS[2], **options)
        list(completer.generate(requests[:1] + [mine] + requests[1:]))
        assert mine.result().token_ids == alone


def test_closing_a_stream_cancels_it_and_frees_its_row(completer):
    engine = completer.engine
    before = engine.stats()
    stream = completer.stream(PROMPTS[0], max_new_tokens=200)
    next(stream)
    stream.close()
    after = engine.stats()
    assert after["active"] == 0 and after["waiting"] == 0
    assert after["cancelled_requests"] == before["cancelled_requests"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 50
    # The row is free for the next request, which also reuses what the cancelled one left.
    again = completer.complete(PROMPTS[0] + "x", max_new_tokens=4)
    assert again.completion_tokens == 4 and again.cached_prompt_tokens > 0


def test_a_request_longer_than_the_engine_fails_clearly(completer):
    from stablecode.inference.engine import Engine, Failed

    short = Engine(completer.model, max_seq_len=16)
    events = list(short.run([completer.request(PROMPTS[2], max_new_tokens=20)]))
    assert isinstance(events[-1][1], Failed) and "16 slots" in events[-1][1].message
    assert short.stats()["active"] == 0


def test_an_int8_kv_cache_decodes_what_the_model_gives_through_one(tiny_checkpoint):
    from stablecode.kv_cache import KVCache

    int8 = Completer(tiny_checkpoint, kv_cache_dtype="int8", speculative=False)
    for prompt in PROMPTS[:2]:
        ours = int8.complete(prompt, max_new_tokens=16, token_healing=False)
        ids = int8.tokenizer.encode(prompt)
        cache = KVCache.for_model(int8.model, 1, len(ids) + 16, kv_cache_dtype="int8")
        with torch.inference_mode():
            logits = int8.model(torch.tensor([ids]), cache=cache, input_pos=0)[0, -1]
            expected = []
            for position in range(len(ids), len(ids) + 16):
                expected.append(int(logits.argmax()))
                logits = int8.model(torch.tensor([[expected[-1]]]), cache=cache, input_pos=torch.tensor([[position]]),
                                    cache_rows=torch.tensor([0]))[0, -1]
        assert ours.token_ids == expected[:len(ours.token_ids)] and len(ours.token_ids) >= 12
    stats = int8.engine.stats()
    assert stats["kv_cache_dtype"] == "int8" and int8.engine.cache.k.dtype == torch.int8
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        Completer(tiny_checkpoint, kv_cache_dtype="int4")
