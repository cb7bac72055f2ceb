"""Generation: greedy parity with transformers, batching, seeds, stop strings, streaming, EOS and
special tokens, context truncation, max_new_tokens."""

import pytest
import torch

from stablecode import Completer, load_tokenizer
from stablecode.generate import Sequence, StopStringMatcher, fit_to_context, generate
from stablecode.sampling import SamplingParams

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
        ours = completer.complete(prompt, max_new_tokens=24)
        ids = torch.tensor([completer.tokenizer.encode(prompt)])
        with torch.no_grad():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                     eos_token_id=0, pad_token_id=0)
        theirs = out[0, ids.shape[1]:].tolist()
        assert ours.token_ids == theirs
        assert ours.completion_tokens >= 20 and ours.prompt_tokens == ids.shape[1]


def test_batch_of_different_lengths_equals_each_alone(completer):
    alone = [completer.complete(p, max_new_tokens=20) for p in PROMPTS]
    batched = completer.complete_batch(PROMPTS, max_new_tokens=20)
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert len({len(completer.tokenizer.encode(p)) for p in PROMPTS}) == len(PROMPTS)


def test_rows_that_finish_early_leave_the_batch(completer):
    """Different max_new_tokens per row: rows drop out and the others go on unchanged."""
    sequences = [completer.sequence(p, max_new_tokens=n) for p, n in zip(PROMPTS, (3, 17, 9, 25))]
    for _ in generate(completer.model, sequences):
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
        # Streaming token by token neither dropped nor repeated anything of the whole decode.
        assert result.text == completer.tokenizer.decode(result.token_ids)


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
    assert result.prompt_tokens == context - 16 and result.completion_tokens == 16
    # Exactly what completing the kept (most recent) tokens alone gives.
    kept = Sequence(ids[result.truncated_prompt_tokens:], completer.tokenizer, context, max_new_tokens=16)
    for _ in generate(completer.model, [kept]):
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


# ---- the per-sequence logic, fed scripted tokens -------------------------------------------------

def feed(sequence: Sequence, ids: list[int]) -> list[str]:
    pieces = []
    for token in ids:
        if sequence.finished:
            break
        pieces.append(sequence.append(token))
    return pieces


def scripted(tokenizer, stop=(), max_new_tokens=100) -> Sequence:
    return Sequence(tokenizer.encode("# start\n"), tokenizer, context_length=256, max_new_tokens=max_new_tokens,
                    stop_strings=stop)


def test_scripted_stop_string_over_many_tokens(tokenizer):
    ids = tokenizer.encode("x = 1\nreturn x\ndef g():\n    pass\n")
    sequence = scripted(tokenizer, stop=["\ndef", "\nclass"])
    pieces = feed(sequence, ids)
    assert sequence.text == "x = 1\nreturn x" and sequence.finish_reason == "stop"
    assert "".join(pieces) == sequence.text


def test_scripted_partial_stop_is_released_at_the_end(tokenizer):
    ids = tokenizer.encode("a = 1\nde")
    sequence = scripted(tokenizer, stop=["\ndef"], max_new_tokens=len(ids))
    pieces = feed(sequence, ids)
    assert "".join(pieces[:-1]) == "a = 1"  # "\nde" held back while it could become the stop string
    assert sequence.text == "a = 1\nde" and sequence.finish_reason == "length"


def test_scripted_multibyte_and_stop_string(tokenizer):
    from test_tokenizer import byte_ids

    ids = byte_ids(tokenizer, "print('日本') # 語 tail")
    sequence = scripted(tokenizer, stop=["語"])
    pieces = feed(sequence, ids)
    assert sequence.text == "print('日本') # " and "".join(pieces) == sequence.text
    assert not any("\ufffd" in p for p in pieces)


def test_scripted_eos_and_specials(tokenizer):
    fim = tokenizer.backend.token_to_id("<fim_middle>")
    sequence = scripted(tokenizer, stop=["zzz"])
    feed(sequence, tokenizer.encode("ab") + [fim] + tokenizer.encode("c") + [tokenizer.eos_id] + tokenizer.encode("d"))
    result = sequence.result()
    assert result.text == "abc" and result.finish_reason == "stop"
    assert result.completion_tokens == len(tokenizer.encode("ab")) + 3


def test_stop_string_matcher_cases():
    def run(pieces, stops):
        matcher = StopStringMatcher(stops)
        shown = [matcher.push(p) for p in pieces]
        return shown, matcher.flush(), matcher.stopped

    assert run(["aa", "a", "b", "c"], ["aab"]) == (["", "a", "", ""], "", True)
    assert run(["x", "y"], []) == (["x", "y"], "", False)
    assert run(["ab", "x"], ["abc", "b"]) == (["a", ""], "", True)  # the earliest stop string wins
    assert run(["end\n", "\n"], ["\n\n\n"]) == (["end", ""], "\n\n", False)


def test_fit_to_context(tokenizer):
    assert fit_to_context(list(range(10)), 5, 100) == (list(range(10)), 0, 5)
    assert fit_to_context(list(range(10)), 5, 12) == ([3, 4, 5, 6, 7, 8, 9], 3, 5)
    assert fit_to_context(list(range(10)), 50, 12) == ([9], 9, 11)
    with pytest.raises(ValueError):
        Sequence([1], tokenizer, 10, max_new_tokens=-1)


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
