"""The server as real clients see it: the `openai` package, huggingface_hub's InferenceClient,
llm-vscode's language server (llm-ls) request shapes for each backend, and each API's streaming
format. Outputs are checked against the library's own greedy completion of the same model."""

import json

import openai
import pytest
from huggingface_hub import InferenceClient

from serving import PROMPTS


def test_health_and_info(client, server):
    assert client.get("/health").json() == {"status": "ready"}
    info = client.get("/info").json()
    assert info["model_id"] == server.engine.model_id
    assert info["context_length"] == info["max_total_tokens"] == 256
    limits = info["limits"]
    for name in ("max_body_bytes", "max_prompt_chars", "max_new_tokens", "max_stop_strings"):
        assert limits[name] > 0
    assert info["max_batch"] == 4 and info["max_queue"] == 8
    assert info["scheduler"]["active"] == 0


# ---- openai ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=30)


def test_openai_completion_matches_library(oai, server, reference):
    prompt = PROMPTS[0]
    result = oai.completions.create(model="anything", prompt=prompt, max_tokens=12, temperature=0)
    assert result.model == server.engine.model_id
    [choice] = result.choices
    assert choice.text == reference(prompt, 12)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= result.usage.completion_tokens <= 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_openai_streaming_equals_whole_answer(oai, reference):
    prompt = PROMPTS[1]
    chunks = list(oai.completions.create(model="m", prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference(prompt, 20)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_openai_several_prompts_n_echo_and_seed(oai, reference):
    result = oai.completions.create(model="m", prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=2, echo=True)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for choice in result.choices:
        prompt = PROMPTS[choice.index // 2]
        assert choice.text == prompt + reference(prompt, 6)
    seeded = [oai.completions.create(model="m", prompt=PROMPTS[2], max_tokens=10, temperature=1.0, seed=7, n=2)
              for _ in range(2)]
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]  # same seed, same text


def test_openai_models_list(oai, server):
    assert [m.id for m in oai.models.list()] == [server.engine.model_id]
    assert oai.models.retrieve(server.engine.model_id).id == server.engine.model_id


def test_openai_errors_are_parsed_by_the_client(oai):
    with pytest.raises(openai.BadRequestError, match="suffix"):
        oai.completions.create(model="m", prompt="def f(", suffix="    return 1\n", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai.completions.create(model="m", prompt="def f(", temperature=3.5, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="stop"):
        oai.completions.create(model="m", prompt="def f(", stop=[f"s{i}" for i in range(17)], max_tokens=4)


def test_openai_stop_string_is_cut_and_never_included(oai, reference):
    prompt = PROMPTS[3]
    full = reference(prompt, 40)
    stop = full[10:13]
    cut = full[:full.find(stop)]
    result = oai.completions.create(model="m", prompt=prompt, max_tokens=40, temperature=0, stop=stop)
    assert result.choices[0].text == cut
    assert result.choices[0].finish_reason == "stop"
    streamed = oai.completions.create(model="m", prompt=prompt, max_tokens=40, temperature=0, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut


# ---- huggingface_hub.InferenceClient (TGI) ---------------------------------------------------

def test_inference_client_plain_stream_and_details(server, reference):
    hf = InferenceClient(model=server.url)
    prompt = PROMPTS[4]
    expected = reference(prompt, 15)
    assert hf.text_generation(prompt, max_new_tokens=15) == expected
    assert "".join(hf.text_generation(prompt, max_new_tokens=15, stream=True)) == expected
    detailed = hf.text_generation(prompt, max_new_tokens=15, details=True)
    assert detailed.generated_text == expected
    assert detailed.details.finish_reason in ("length", "eos_token")
    assert len(detailed.details.tokens) == detailed.details.generated_tokens
    events = list(hf.text_generation(prompt, max_new_tokens=15, stream=True, details=True))
    assert events[-1].generated_text == expected and events[-1].details.generated_tokens == len(events)
    assert all(e.generated_text is None for e in events[:-1])
    assert [e.token.id for e in events] == [t.id for t in detailed.details.tokens]


def test_inference_client_return_full_text_and_stop(server, reference):
    hf = InferenceClient(model=server.url)
    prompt = PROMPTS[5]
    full = reference(prompt, 30)
    assert hf.text_generation(prompt, max_new_tokens=30, return_full_text=True) == prompt + full
    stop = full[5:8]
    detailed = hf.text_generation(prompt, max_new_tokens=30, stop=[stop], details=True)
    assert detailed.generated_text == full[:full.find(stop)]
    assert detailed.details.finish_reason == "stop_sequence"


def test_inference_client_errors_raise(server):
    from huggingface_hub.errors import ValidationError

    hf = InferenceClient(model=server.url)
    with pytest.raises(ValidationError, match="top_p"):
        hf.text_generation("x = 1", max_new_tokens=4, top_p=1.5)
    with pytest.raises(ValidationError, match="at most 16"):
        hf.text_generation("x = 1", max_new_tokens=4, stop=[f"s{i}" for i in range(17)])
    with pytest.raises(ValidationError, match="not supported.*watermark"):
        hf.text_generation("x = 1", max_new_tokens=4, watermark=True)


# ---- llm-ls (llm-vscode's language server) request shapes --------------------------------------

LLM_LS_HEADERS = {"Authorization": "Bearer hf_user_token", "User-Agent": "llm-ls/0.5.3; rust/unknown; ide/VSCode"}


def test_llm_ls_tgi_backend(client, reference):
    prompt = PROMPTS[0]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 20, "return_full_text": False}}
    answer = client.post("/generate", json=body, headers=LLM_LS_HEADERS).json()
    assert answer == {"generated_text": reference(prompt, 20)}  # one object: llm-ls rejects a list here
    sampled = {"inputs": prompt, "parameters": {"max_new_tokens": 60, "temperature": 0.2, "top_p": 0.95,
                                                "return_full_text": False}}
    assert isinstance(client.post("/generate", json=sampled).json()["generated_text"], str)


def test_llm_ls_default_body_nests_parameters(client):
    # Without a user requestBody llm-ls sends {"parameters": {"parameters": {...}}}: the inner one is ignored.
    body = {"inputs": "def f(x):\n", "parameters": {"parameters": {"return_full_text": False}}}
    response = client.post("/generate", json=body, headers=LLM_LS_HEADERS)
    assert response.status_code == 200 and isinstance(response.json()["generated_text"], str)


def test_llm_ls_huggingface_backend(client, reference):
    prompt = PROMPTS[2]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 10, "return_full_text": False}}
    answer = client.post("/models/stabilityai/stablecode-completion-alpha-3b-4k", json=body).json()
    assert answer == [{"generated_text": reference(prompt, 10)}]


def test_llm_ls_openai_backend(client, reference):
    prompt = PROMPTS[3]
    body = {"prompt": prompt, "model": "stablecode", "stream": False, "max_tokens": 10, "temperature": 0,
            "parameters": {"parameters": {"return_full_text": False}}, "options": {"whatever": 1}}
    answer = client.post("/v1/completions", json=body, headers=LLM_LS_HEADERS).json()
    assert answer["choices"][0]["text"] == reference(prompt, 10)


def test_llm_ls_ollama_backend(client, reference):
    prompt = PROMPTS[1]
    body = {"prompt": prompt, "model": "stablecode", "stream": False,
            "options": {"num_predict": 10, "temperature": 0}, "parameters": {"parameters": {}}}
    answer = client.post("/api/generate", json=body).json()
    assert answer["response"] == reference(prompt, 10)
    assert answer["done"] is True and answer["done_reason"] in ("stop", "length")


# ---- streaming formats -----------------------------------------------------------------------

def test_tgi_generate_stream_events(client, reference):
    prompt = PROMPTS[0]
    with client.stream("POST", "/generate_stream", json={"inputs": prompt, "parameters": {"max_new_tokens": 12}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data:") for line in lines)
    assert "[DONE]" not in lines[-1]  # TGI's /generate_stream sends no [DONE]
    events = [json.loads(line[len("data:"):]) for line in lines]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(set(e["token"]) == {"id", "text", "logprob", "special"} for e in events)
    assert all(e["generated_text"] is None for e in events[:-1])
    text = "".join(e["token"]["text"] for e in events)
    assert events[-1]["generated_text"] == text == reference(prompt, 12)


def test_ollama_streams_ndjson_by_default(client, reference):
    prompt = PROMPTS[5]
    with client.stream("POST", "/api/generate", json={"model": "m", "prompt": prompt,
                                                       "options": {"num_predict": 12, "temperature": 0}}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert "".join(line["response"] for line in lines) == reference(prompt, 12)
    assert lines[-1]["eval_count"] >= 1


def test_ollama_discovery_and_load_request(client, server):
    assert [m["name"] for m in client.get("/api/tags").json()["models"]] == [server.engine.model_id]
    assert "version" in client.get("/api/version").json()
    loaded = client.post("/api/generate", json={"model": "m"}).json()
    assert loaded["done"] is True and loaded["response"] == ""


# ---- prompt handling -------------------------------------------------------------------------

def test_long_prompt_is_cut_from_the_left(client, server):
    tokenizer = server.engine.tokenizer
    prompt = "".join(f"value_{i} = {i} * {i}\n" for i in range(400))
    ids = tokenizer.encode(prompt)
    assert len(ids) > 256
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0}
    answer = client.post("/v1/completions", json=body).json()
    # Same as sending only the last (context - max_tokens) tokens.
    kept = client.post("/v1/completions", json={**body, "prompt": ids[-(256 - 16):]}).json()
    assert answer["choices"][0]["text"] == kept["choices"][0]["text"]
    # the prompt's last token ("\n") is given back to the model to choose again (token healing)
    assert answer["usage"]["prompt_tokens"] == kept["usage"]["prompt_tokens"] == 256 - 16 - 1


def test_tgi_truncate_keeps_the_last_tokens(client, server):
    prompt = PROMPTS[2]
    ids = server.engine.tokenizer.encode(prompt)
    answer = client.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 8, "truncate": 4}})
    expected = client.post("/v1/completions", json={"prompt": ids[-4:], "max_tokens": 8, "temperature": 0})
    assert answer.json()["generated_text"] == expected.json()["choices"][0]["text"]


def _biased(engine, token_id):
    """Make the served model always prefer `token_id` (to force special tokens out of a random model)."""
    model = engine.model
    forward = model.forward

    def biased_forward(*args, **kwargs):
        logits = forward(*args, **kwargs)
        logits[..., token_id] += 1000.0
        return logits

    model.forward = biased_forward
    return model


def test_special_tokens_never_reach_the_text(client, server):
    tokenizer = server.engine.tokenizer
    fim_prefix = tokenizer.backend.token_to_id("<fim_prefix>")
    model = _biased(server.engine, fim_prefix)
    try:
        # "x" is one token, so token healing leaves it alone and every new token is the biased one
        answer = client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 5, "details": True}})
        details = answer.json()["details"]
        assert answer.json()["generated_text"] == ""
        assert [t["id"] for t in details["tokens"]] == [fim_prefix] * 5
        # As TGI: a special token's own text is its name, flagged special; the completion never has it.
        assert all(t["special"] and t["text"] == "<fim_prefix>" for t in details["tokens"])
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5}).json()["choices"][0]["text"] == ""
    finally:
        del model.forward
    model = _biased(server.engine, tokenizer.eos_id)
    try:
        answer = client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 5, "details": True}})
        assert answer.json()["generated_text"] == ""
        assert answer.json()["details"]["finish_reason"] == "eos_token"
        assert answer.json()["details"]["generated_tokens"] == 1
        ollama = client.post("/api/generate", json={"prompt": "x", "stream": False}).json()
        assert ollama["response"] == "" and ollama["done_reason"] == "stop"
    finally:
        del model.forward
