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


