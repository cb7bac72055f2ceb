"""The one validation stage (stablecode.server.validation) that every route's request goes through:
what it refuses, in which order (cheap checks before tokenising), and the fill-in-the-middle rule
driven by the model's config."""

import json

import pytest

from stablecode.server.validation import (FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, ApiError, GenerationRequest, Limits,
                                          Validator, suffix_stop)
from stablecode.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def validator(tokenizer, fim=False, **limits):
    return Validator(tokenizer, vocab_size=512, context_length=256, fim=fim, limits=Limits(**limits), attribution=False)


class CountingTokenizer:
    """The real tokenizer, counting how often it is asked to encode."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text):
        self.calls += 1
        return self.inner.encode(text)


# ---- the API-neutral stage ---------------------------------------------------------------------

def test_a_huge_prompt_list_is_refused_before_any_prompt_is_tokenised(tokenizer):
    counting = CountingTokenizer(tokenizer)
    v = Validator(counting, vocab_size=512, context_length=256, fim=False, limits=Limits(), attribution=False)
    with pytest.raises(ApiError, match="650,000 prompts") as e:
        v.validate(GenerationRequest(prompts=[""] * 650_000, max_new_tokens=4))
    assert e.value.status == 422 and counting.calls == 0
    with pytest.raises(ApiError, match="n=9"):
        v.validate(GenerationRequest(prompts=["a", "b"], n=9, max_new_tokens=4))
    assert counting.calls == 0
    # Every cheap check comes before tokenising: a bad parameter costs no encode either.
    with pytest.raises(ApiError, match="temperature"):
        v.validate(GenerationRequest(prompts=["x" * 1000] * 16, max_new_tokens=4, temperature=1e-30))
    assert counting.calls == 0
    valid = v.validate(GenerationRequest(prompts=["def f(", [5, 6, 7]], n=2, max_new_tokens=4, seed=3))
    assert counting.calls == 1 and valid.num_sequences == 4
    assert valid.prompts[0].ids == tokenizer.encode("def f(") and valid.prompts[1].ids == [5, 6, 7]


@pytest.mark.parametrize("field, value, message", [
    ("temperature", 1e-30, "at least 0.001"),
    ("temperature", 5e-324, "at least 0.001"),
    ("temperature", float("nan"), "temperature"),
    ("repetition_penalty", 1e-30, "repetition_penalty"),
    ("repetition_penalty", 1e6, "repetition_penalty"),
    ("top_p", 0.0, "top_p"),
    ("top_k", -1, "top_k"),
    ("max_new_tokens", 257, "max_new_tokens"),
    ("seed", 2**63, "seed"),
])
def test_out_of_range_sampling_is_a_422_naming_the_field(tokenizer, field, value, message):
    with pytest.raises(ApiError, match=message) as e:
        validator(tokenizer).validate(GenerationRequest(prompts=["x"], **{"max_new_tokens": 4, field: value}))
    assert e.value.status == 422 and e.value.param == field


def test_error_messages_use_the_api_s_own_names(tokenizer):
    request = GenerationRequest(prompts=["x"], max_new_tokens=10_000, names={"max_new_tokens": "num_predict"})
    with pytest.raises(ApiError, match="num_predict") as e:
        validator(tokenizer).validate(request)
    assert e.value.param == "num_predict"


def test_sixteen_stop_strings_are_accepted_and_seventeen_refused(tokenizer):
    stops = [f"s{i}" for i in range(16)]
    assert validator(tokenizer).validate(GenerationRequest(prompts=["x"], max_new_tokens=2, stop=stops)).stop == \
        tuple(stops)
    with pytest.raises(ApiError, match="17 stop strings"):
        validator(tokenizer).validate(GenerationRequest(prompts=["x"], max_new_tokens=2, stop=stops + ["s16"]))


# ---- fill-in-the-middle: one rule, from the model's config -------------------------------------

def test_a_model_not_trained_for_fim_refuses_suffix_and_fim_tokens(tokenizer):
    v = validator(tokenizer, fim=False)
    with pytest.raises(ApiError, match="not trained"):
        v.validate(GenerationRequest(prompts=["def f("], suffix="\n    return 1\n", max_new_tokens=4))
    with pytest.raises(ApiError, match="<fim_prefix>"):
        v.validate(GenerationRequest(prompts=[f"{FIM_PREFIX}def f({FIM_SUFFIX}){FIM_MIDDLE}"], max_new_tokens=4))
    fim_middle = tokenizer.backend.token_to_id(FIM_MIDDLE)
    with pytest.raises(ApiError, match="<fim_middle>"):
        v.validate(GenerationRequest(prompts=[[5, 6, fim_middle]], max_new_tokens=4))


def test_a_fim_model_builds_the_psm_prompt_from_a_suffix(tokenizer):
    v = validator(tokenizer, fim=True)
    valid = v.validate(GenerationRequest(prompts=["def f("], suffix="):\n    pass\n", max_new_tokens=4))
    assert valid.prompts[0].ids == tokenizer.encode(f"{FIM_PREFIX}def f({FIM_SUFFIX}):\n    pass\n{FIM_MIDDLE}")
    assert valid.prompts[0].text == "def f("
    with pytest.raises(ApiError, match="not both"):
        v.validate(GenerationRequest(prompts=[f"{FIM_PREFIX}a{FIM_SUFFIX}b{FIM_MIDDLE}"], suffix="c", max_new_tokens=4))


@pytest.mark.parametrize("suffix, stop", [
    ("\n\nprint(add(1, 2))\n", "\n\nprint(add(1, 2))"),  # cursor at a line's end: the newlines belong to the stop
    ("    return result\n", "    return result"),  # cursor at a line's start: the middle keeps its newline
    ("):\n    pass\n", "):\n    pass"),  # too short a first line: up to the next one
    ("\r\n}\r\n", None),  # nothing long enough to tell from ordinary code
    ("", None),
])
def test_a_fim_answer_stops_where_the_suffix_would_start_again(suffix, stop):
    assert suffix_stop(suffix) == stop


def test_every_way_of_asking_for_fim_gets_the_suffix_stop_and_plain_prompts_none(tokenizer):
    v = validator(tokenizer, fim=True)
    prefix, suffix = "def f(x):\n", "    return x\n"
    psm = f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"
    for request in (GenerationRequest(prompts=[prefix], suffix=suffix, max_new_tokens=4),
                    GenerationRequest(prompts=[psm], max_new_tokens=4),
                    GenerationRequest(prompts=[tokenizer.encode(psm)], max_new_tokens=4)):
        assert v.validate(request).prompts[0].stop == ("    return x",)
    plain = v.validate(GenerationRequest(prompts=[prefix, psm], max_new_tokens=4, stop=["\n\n"]))
    assert [p.stop for p in plain.prompts] == [(), ("    return x",)] and plain.stop == ("\n\n",)


def test_a_too_long_fim_prompt_keeps_its_sentinels_and_the_code_around_the_cursor(tokenizer):
    prefix = "".join(f"line_{i} = {i}\n" for i in range(200))
    suffix = "".join(f"after_{i}()\n" for i in range(200))
    valid = validator(tokenizer, fim=True).validate(GenerationRequest(prompts=[prefix], suffix=suffix, max_new_tokens=56))
    ids = valid.prompts[0].ids
    ids_of = tokenizer.backend.token_to_id
    assert len(ids) == 256 - 56
    assert ids[0] == ids_of(FIM_PREFIX) and ids[-1] == ids_of(FIM_MIDDLE) and ids.count(ids_of(FIM_SUFFIX)) == 1
    split = ids.index(ids_of(FIM_SUFFIX))
    kept_prefix, kept_suffix = tokenizer.decode(ids[1:split]), tokenizer.decode(ids[split + 1:-1])
    assert prefix.endswith(kept_prefix) and suffix.startswith(kept_suffix)  # the cursor's neighbourhood
    assert len(ids[1:split]) >= 3 * len(ids[split + 1:-1])  # the prefix matters most


# ---- through every API -------------------------------------------------------------------------

def test_huge_prompt_list_over_http_is_refused_without_tokenising(server, client):
    tokenizer = server.engine.validator.tokenizer
    counting = CountingTokenizer(tokenizer)
    server.engine.validator.tokenizer = counting
    try:
        body = json.dumps({"prompt": [""] * 650_000, "max_tokens": 1}, separators=(",", ":"))
        response = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    finally:
        server.engine.validator.tokenizer = tokenizer
    assert response.status_code == 400, response.text
    assert "650,000 prompts" in response.json()["error"]["message"] and counting.calls == 0


@pytest.mark.parametrize("path, body", [
    ("/generate", {"inputs": "x = ", "parameters": {"temperature": 1e-30, "max_new_tokens": 2}}),
    ("/generate", {"inputs": "x = ", "parameters": {"do_sample": True, "repetition_penalty": 1e-30}}),
    ("/v1/completions", {"prompt": "x = ", "temperature": 1e-30, "max_tokens": 2}),
    ("/v1/completions", {"prompt": "x = ", "repetition_penalty": 1e-30, "max_tokens": 2}),
    ("/api/generate", {"prompt": "x = ", "stream": False, "options": {"temperature": 1e-30}}),
    ("/api/generate", {"prompt": "x = ", "stream": False, "options": {"repeat_penalty": 1e-30}}),
])
def test_tiny_temperatures_and_penalties_are_a_clear_4xx_not_a_500(client, path, body):
    response = client.post(path, json=body)
    assert response.status_code in (400, 422), response.text
    text = response.text
    assert ("temperature" in text or "penalty" in text) and "sampling failed" not in text


def test_continue_s_temperature_is_fine(client):
    """Continue's autocomplete asks for temperature 0.01."""
    response = client.post("/v1/completions", json={"prompt": "x = ", "temperature": 0.01, "max_tokens": 3})
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"]


@pytest.mark.parametrize("path, body, param", [
    ("/generate", {"inputs": f"{FIM_PREFIX}def f({FIM_SUFFIX}){FIM_MIDDLE}"}, "inputs"),
    ("/v1/completions", {"prompt": f"{FIM_PREFIX}def f({FIM_SUFFIX}){FIM_MIDDLE}"}, "prompt"),
    ("/v1/completions", {"prompt": "def f(", "suffix": ")\n"}, "suffix"),
    ("/api/generate", {"prompt": f"{FIM_PREFIX}def f({FIM_SUFFIX}){FIM_MIDDLE}"}, "prompt"),
    ("/api/generate", {"prompt": "def f(", "suffix": ")\n"}, "suffix"),
])
def test_fim_for_a_model_not_trained_for_it_is_refused_by_every_api(client, server, path, body, param):
    assert server.engine.config.fim is False
    response = client.post(path, json=body)
    assert response.status_code in (400, 422), response.text
    assert "fill-in-the-middle" in response.text
    if path.startswith("/v1/"):
        assert response.json()["error"]["param"] == param
    assert client.get("/info").json()["fill_in_the_middle"] is False


def test_a_fim_model_answers_suffix_as_the_psm_prompt_on_every_api(fim_server):
    import httpx

    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    psm = f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"
    with httpx.Client(base_url=fim_server.url, timeout=30) as c:
        assert c.get("/info").json()["fill_in_the_middle"] is True
        explicit = c.post("/generate", json={"inputs": psm, "parameters": {"max_new_tokens": 8}}).json()
        oai = c.post("/v1/completions", json={"prompt": prefix, "suffix": suffix, "max_tokens": 8,
                                              "temperature": 0}).json()
        ollama = c.post("/api/generate", json={"prompt": prefix, "suffix": suffix, "stream": False, "raw": True,
                                               "options": {"temperature": 0, "num_predict": 8}}).json()
        assert oai["choices"][0]["text"] == ollama["response"] == explicit["generated_text"]
        assert oai["usage"]["prompt_tokens"] == len(fim_server.engine.tokenizer.encode(psm))
        assert FIM_PREFIX not in explicit["generated_text"]
        # The explicit template through OpenAI (what Continue sends) gives the same.
        assert c.post("/v1/completions", json={"prompt": psm, "max_tokens": 8, "temperature": 0}).json()[
            "choices"][0]["text"] == explicit["generated_text"]


def test_tgi_truncate_on_a_fim_prompt_keeps_the_sentinels(tokenizer):
    ids_of = tokenizer.backend.token_to_id
    prompt = f"{FIM_PREFIX}{'a = 1' * 40}{FIM_SUFFIX}{'b = 2' * 40}{FIM_MIDDLE}"
    valid = validator(tokenizer, fim=True).validate(GenerationRequest(prompts=[prompt], max_new_tokens=4, truncate=20))
    ids = valid.prompts[0].ids
    assert len(ids) == 20 and ids[0] == ids_of(FIM_PREFIX) and ids[-1] == ids_of(FIM_MIDDLE)
    plain = validator(tokenizer).validate(GenerationRequest(prompts=["a = 1" * 40], max_new_tokens=4, truncate=20))
    assert plain.prompts[0].ids == tokenizer.encode("a = 1" * 40)[-20:]


def test_attribution_with_echo_is_bounded_before_generating(tokenizer):
    v = Validator(tokenizer, vocab_size=512, context_length=256, fim=False, limits=Limits(), attribution=True)
    prompt = "x" * 200_000
    request = GenerationRequest(prompts=[prompt], max_new_tokens=4, n=16, attribution=True, echo=True)
    with pytest.raises(ApiError, match="3,200,000 prompt characters") as e:
        v.validate(request)
    assert e.value.status == 413
    assert v.validate(GenerationRequest(prompts=[prompt], max_new_tokens=4, n=4, attribution=True, echo=True))
    assert v.validate(GenerationRequest(prompts=[prompt], max_new_tokens=4, n=16, attribution=True))
