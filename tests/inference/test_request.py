"""The per-request logic fed scripted tokens: stop strings across tokens, multibyte text, EOS and
special tokens, context fitting."""

import pytest

from stablecode import load_tokenizer
from stablecode.inference.request import Request, StopStringMatcher, fit_to_context


@pytest.fixture(scope="module")
def tokenizer(byte_tokenizer_file):
    return load_tokenizer(byte_tokenizer_file)


def feed(sequence: Request, ids: list[int]) -> list[str]:
    pieces = []
    for token in ids:
        if sequence.finished:
            break
        pieces.append(sequence.append(token))
    return pieces


def scripted(tokenizer, stop=(), max_new_tokens=100) -> Request:
    return Request(tokenizer.encode("# start\n"), tokenizer, context_length=256, max_new_tokens=max_new_tokens,
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
        Request([1], tokenizer, 10, max_new_tokens=-1)




# ---- token healing ---------------------------------------------------------------------------------

def healed(tokenizer, prompt: str, **options) -> Request:
    return Request(tokenizer.encode(prompt), tokenizer, context_length=256, token_healing=True, **options)


def test_healing_gives_the_last_token_back_and_hides_its_text(tokenizer):
    prompt = "for i in range(10):\n"
    ids = tokenizer.encode(prompt)
    request = healed(tokenizer, prompt, max_new_tokens=20)
    assert request.prompt_ids == ids[:-1]
    assert request.healed_text == tokenizer.token_text(ids[-1])
    assert request.max_new_tokens == 20  # the first new token stands in for the one given back, and counts
    rest = "    print(i)\n"
    continuation = tokenizer.encode(request.healed_text + rest)
    assert tokenizer.token_text(continuation[0]).startswith(request.healed_text)
    assert "".join(feed(request, continuation)) + request.stops.flush() == rest
    assert request.result().prompt_tokens == len(ids) - 1  # the tokens that ran as prompt


def test_the_first_choice_is_limited_to_tokens_that_start_with_the_healed_text(tokenizer):
    import torch

    request = healed(tokenizer, "for i in range(10):\n")
    allowed = set(tokenizer.tokens_starting_with(request.healed_text))
    assert len(allowed) >= 2 and all(tokenizer.token_text(i).startswith(request.healed_text) for i in allowed)
    logits = torch.zeros(tokenizer.vocab_size)
    best_outside = next(i for i in range(tokenizer.vocab_size) if i not in allowed)
    logits[best_outside] = 10.0
    first = request.choose(logits)
    assert first in allowed
    request.append(first)
    assert request.choose(logits) == best_outside  # only the first token is constrained


def test_no_healing_after_a_special_token_or_when_off(tokenizer):
    fim = "<fim_prefix>def f():\n<fim_suffix>\n<fim_middle>"
    ids = tokenizer.encode(fim)
    assert healed(tokenizer, fim).prompt_ids == ids
    assert healed(tokenizer, fim).healed_text == ""
    plain = Request(tokenizer.encode("x = 1\n"), tokenizer, context_length=256)
    assert plain.prompt_ids == tokenizer.encode("x = 1\n") and plain.healed_text == ""
    assert healed(tokenizer, "x = 1\n", max_new_tokens=0).prompt_ids == tokenizer.encode("x = 1\n")
