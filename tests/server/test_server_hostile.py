"""Bad input of every kind gets a clear 4xx JSON error in the format of the API it was sent to,
and the server keeps serving."""

import json

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from serving import running
from stablecode.server import create_app


@pytest.fixture(autouse=True)
def still_serving(client):
    """After every test: the server is alive and still completes."""
    yield
    assert client.get("/health").status_code == 200
    answer = client.post("/generate", json={"inputs": "x = 1\n", "parameters": {"max_new_tokens": 3}})
    assert answer.status_code == 200 and isinstance(answer.json()["generated_text"], str)


def tgi_error(response, status=422):
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"] and body["error_type"]
    return body["error"]


def openai_error(response, status=400):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    # llm-ls reads FastAPI-style details with a string (or int) `loc`.
    assert all(isinstance(d["loc"], str) and d["msg"] and d["type"] for d in body["detail"])
    return body["error"]["message"]


def ollama_error(response, status=400):
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_malformed_json(client):
    bad = b'{"inputs": "def f(", "parameters": {'
    headers = {"Content-Type": "application/json"}
    assert "not valid JSON" in tgi_error(client.post("/generate", content=bad, headers=headers))
    assert "not valid JSON" in openai_error(client.post("/v1/completions", content=bad, headers=headers))
    assert "not valid JSON" in ollama_error(client.post("/api/generate", content=bad, headers=headers))
    assert tgi_error(client.post("/generate", content=b"", headers=headers))  # no body at all
    assert tgi_error(client.post("/generate", content=b"[1, 2]", headers=headers))  # JSON, wrong shape


def test_invalid_utf8(client):
    raw = b'{"inputs": "def f(\xff\xfe):", "parameters": {"max_new_tokens": 2}}'
    message = tgi_error(client.post("/generate", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert "UTF-8" in message
    # A lone surrogate escape is valid JSON but not Unicode text.
    lone = b'{"inputs": "def f(\\ud800):"}'
    assert "not valid Unicode" in tgi_error(client.post("/generate", content=lone,
                                                        headers={"Content-Type": "application/json"}))
    assert "not valid Unicode" in openai_error(client.post("/v1/completions", content=lone.replace(b"inputs", b"prompt"),
                                                           headers={"Content-Type": "application/json"}))


@pytest.mark.parametrize("body, field", [
    ({"inputs": 5}, "inputs"),
    ({"inputs": ["a", "b"]}, "inputs"),
    ({"parameters": {"max_new_tokens": 4}}, "inputs"),
    ({"inputs": "x", "parameters": "fast"}, "parameters"),
    ({"inputs": "x", "parameters": {"max_new_tokens": "many"}}, "max_new_tokens"),
    ({"inputs": "x", "parameters": {"stop": "\n"}}, "stop"),
    ({"inputs": "x", "parameters": {"temperature": [1]}}, "temperature"),
    ({"inputs": "x", "parameters": {"do_sample": "perhaps"}}, "do_sample"),
])
def test_tgi_wrong_types(client, body, field):
    assert field in tgi_error(client.post("/generate", json=body))


@pytest.mark.parametrize("parameters, field", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"seed": -1}, "seed"),
    ({"truncate": 0}, "truncate"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"stop": ["x" * 257]}, "stop"),
    ({"best_of": 2}, "best_of"),
])
def test_tgi_out_of_range(client, parameters, field):
    assert field in tgi_error(client.post("/generate", json={"inputs": "x = ", "parameters": parameters}))


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": ["a"] * 9, "n": 2}, "n"),
    ({"prompt": [], "max_tokens": 2}, "prompt"),
    ({"prompt": [1, 2, 10**6]}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"max_tokens": 2}, "prompt"),
])
def test_openai_bad_values(client, body, field):
    assert field in openai_error(client.post("/v1/completions", json=body))


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "options": {"temperature": "warm"}}, "temperature"),
    ({"prompt": "x", "options": {"num_predict": -3}}, "num_predict"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "system": "You are a helpful assistant"}, "system"),
    ({"prompt": "x", "stream": "yes please"}, "stream"),
])
def test_ollama_bad_values(client, body, field):
    assert field in ollama_error(client.post("/api/generate", json=body))


def test_empty_and_over_long_prompts(client, server):
    assert "empty" in tgi_error(client.post("/generate", json={"inputs": ""}))
    limit = server.engine.limits.max_prompt_chars
    long_prompt = "x" * (limit + 1)
    assert "limit" in tgi_error(client.post("/generate", json={"inputs": long_prompt}), 413)
    assert "limit" in openai_error(client.post("/v1/completions", json={"prompt": long_prompt}), 413)
    assert "limit" in ollama_error(client.post("/api/generate", json={"prompt": long_prompt}), 413)


def test_unknown_fields_are_ignored_at_every_level(client):
    tgi = {"inputs": "x = ", "made_up": {"a": 1}, "parameters": {"max_new_tokens": 3, "mystery": True,
                                                                   "parameters": {"return_full_text": False}}}
    assert client.post("/generate", json=tgi).status_code == 200
    oai = {"prompt": "x = ", "max_tokens": 3, "made_up": 1, "stream_options": {"include_usage": False, "other": 2},
           "parameters": {"max_new_tokens": 60}, "options": {"num_predict": 3}}
    assert client.post("/v1/completions", json=oai).status_code == 200
    ollama = {"prompt": "x = ", "stream": False, "keep_alive": "5m", "options": {"num_predict": 3, "mirostat": 2}}
    assert client.post("/api/generate", json=ollama).status_code == 200


def test_huge_body_is_refused_before_parsing(client, server):
    limit = server.engine.limits.max_body_bytes
    huge = json.dumps({"inputs": "x" * (limit + 10)}).encode()
    message = tgi_error(client.post("/generate", content=huge, headers={"Content-Type": "application/json"}), 413)
    assert "larger than" in message

    def chunks():  # no Content-Length: chunked transfer encoding
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    response = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "larger than" in openai_error(response, 413)


def test_unknown_route_and_method(client):
    assert "no route" in tgi_error(client.post("/generate_everything", json={}), 404)
    assert tgi_error(client.get("/generate"), 405)
    # Chat routes: a completion model has no chat template; the error names the completion route.
    assert "use POST /v1/completions" in openai_error(client.post("/v1/chat/completions", json={}), 404)
    response = client.post("/api/chat", json={"model": "m", "messages": []})
    assert response.status_code == 404 and "use POST /api/generate" in response.text


def test_api_key(tiny_checkpoint):
    with running(create_app(tiny_checkpoint, api_key="s3cret", max_batch=2)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            body = {"inputs": "x = ", "parameters": {"max_new_tokens": 2}}
            assert "missing API key" in tgi_error(c.post("/generate", json=body), 401)
            assert "invalid API key" in tgi_error(c.post("/generate", json=body,
                                                         headers={"Authorization": "Bearer wrong"}), 401)
            assert tgi_error(c.post("/generate", json=body, headers={"Authorization": "Basic s3cret"}), 401)
            assert openai_error(c.get("/v1/models"), 401)
            assert ollama_error(c.post("/api/generate", json={"prompt": "x"}), 401)
            assert c.post("/generate", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert c.get("/health").status_code == 200  # probes need no key
            assert c.get("/openapi.json").status_code == 200
        wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            wrong.completions.create(model="m", prompt="x", max_tokens=2)
        right = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert right.completions.create(model="m", prompt="x", max_tokens=2).choices[0].finish_reason
        assert isinstance(InferenceClient(model=server.url, token="s3cret").text_generation("x", max_new_tokens=2), str)
