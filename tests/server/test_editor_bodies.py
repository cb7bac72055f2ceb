"""The exact request bodies editors send (Continue, llm-ls, curl, the ollama client) and the details
their parsers read."""

import json
import shutil
import subprocess

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from serving import slowed, wait_for

# Continue's getStopTokens(): the StarCoder/StableCode FIM template's 7 stop words, then its
# multi-line stops, then its 3 common stops (trimmed to 4 only for api.openai.com and a few hosts).
CONTINUE_STOPS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "</fim_middle>",
                  "</code>", "\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8", "```"]
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"


def continue_openai_body(prompt: str) -> dict:
    """Continue's OpenAI provider, autocomplete through the legacy completions endpoint."""
    return {"model": "stablecode-nano", "prompt": prompt, "max_tokens": 16, "temperature": 0.01,
            "stop": CONTINUE_STOPS, "stream": True}


# ---- Continue ----------------------------------------------------------------------------------

def test_continue_autocomplete_body_with_twelve_stop_words(fim_server):
    """Continue's StableCode FIM template against a FIM model, streamed: no 400 for its 12 stops."""
    body = continue_openai_body(f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>")
    with httpx.Client(base_url=fim_server.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body, headers={"Authorization": "Bearer none"}) as response:
            assert response.status_code == 200, response.read()
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert not any(stop in text for stop in CONTINUE_STOPS if stop)
    # The same through the openai package.
    client = openai.OpenAI(base_url=fim_server.url + "/v1", api_key="none", max_retries=0)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="stablecode-nano", prompt=body["prompt"], max_tokens=16, temperature=0.01, stop=CONTINUE_STOPS,
        stream=True))
    assert isinstance(streamed, str)


def test_continue_ollama_provider_body(fim_server):
    """Continue's Ollama provider: /api/show first, then raw generate with options, keep_alive and suffix."""
    with httpx.Client(base_url=fim_server.url, timeout=30) as c:
        show = c.post("/api/show", json={"name": "stablecode-nano"})
        assert show.status_code == 200 and ".Suffix" in show.json()["template"]  # Continue: FIM supported
        body = {"model": "stablecode-nano", "prompt": PREFIX, "suffix": SUFFIX, "raw": True, "stream": True,
                "keep_alive": 1800, "options": {"temperature": 0.01, "num_predict": 8, "stop": CONTINUE_STOPS,
                                                "num_ctx": 256}}
        with c.stream("POST", "/api/generate", json=body) as response:
            assert response.status_code == 200, response.read()
            objects = [json.loads(line) for line in response.iter_lines() if line]
    assert objects[-1]["done"] is True and all(not o["done"] for o in objects[:-1])


def test_the_embedded_model_does_not_write_the_suffix_again_on_any_fim_route(one_torch_thread):
    """Asked to fill a loop's body, the embedded model goes straight on to `return result`, the
    code after the cursor, which the editor would then show twice: the answer ends before it."""
    from serving import running
    from stablecode.server import create_app

    prefix = "import os\n\n\ndef python_files(path):\n    result = []\n    for name in os.listdir(path):\n"
    suffix = "    return result\n"
    psm = f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
    with running(create_app("stablecode-nano", max_batch=2, max_queue=4)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        answers = [client.completions.create(model="stablecode-nano", prompt=prefix, suffix=suffix, max_tokens=32,
                                             temperature=0).choices[0].text,
                   InferenceClient(server.url).text_generation(psm, max_new_tokens=32)]
        with httpx.Client(base_url=server.url, timeout=60) as c:
            body = {"prompt": prefix, "suffix": suffix, "raw": True, "stream": False,
                    "options": {"temperature": 0, "num_predict": 32}}
            answers.append(c.post("/api/generate", json=body).json()["response"])
    assert len(set(answers)) == 1
    assert "return result" not in answers[0]


def test_ollama_show_of_a_model_without_fim_has_no_suffix_in_its_template(client):
    show = client.post("/api/show", json={"model": "x"}).json()
    assert ".Suffix" not in show["template"] and show["details"]["family"] == "gptneox"


# ---- curl -d and the ollama client -------------------------------------------------------------

def test_ollama_route_reads_json_whatever_the_content_type(client):
    body = json.dumps({"model": "stablecode", "prompt": "def f(x):\n", "stream": False, "options": {"num_predict": 3}})
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = client.post("/api/generate", content=body, headers=headers)
        assert response.status_code == 200, (content_type, response.text)
        assert response.json()["done"] is True
    bad = client.post("/api/generate", content=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_docs_curl_example(server):
    """The docs' own example, as curl -d sends it (application/x-www-form-urlencoded)."""
    out = subprocess.run(["curl", "-sS", "-N", f"{server.url}/api/generate", "-d",
                          '{"model": "stablecode", "prompt": "def fibonacci(n):\\n", "options": {"num_predict": 4}}'],
                         capture_output=True, text=True, timeout=60)
    objects = [json.loads(line) for line in out.stdout.splitlines() if line]
    assert objects and objects[-1]["done"] is True, out.stdout + out.stderr


def test_ollama_client_sees_durations(server):
    ollama = pytest.importorskip("ollama")
    answer = ollama.Client(host=server.url).generate(model="stablecode", prompt="def f(x):\n",
                                                     options={"num_predict": 5, "temperature": 0})
    assert answer.done and answer.eval_count >= 1
    assert answer.prompt_eval_duration > 0 and answer.eval_duration >= 0
    assert answer.prompt_eval_duration + answer.eval_duration <= answer.total_duration
    streamed = list(ollama.Client(host=server.url).generate(model="stablecode", prompt="def f(x):\n", stream=True,
                                                            options={"num_predict": 5, "temperature": 0}))
    assert streamed[-1].done and streamed[-1].prompt_eval_duration > 0 and streamed[-1].eval_duration is not None
    assert "".join(part.response for part in streamed) == answer.response


# ---- TGI fidelity ------------------------------------------------------------------------------

def test_details_tokens_carry_their_own_text_with_stop_strings(client, server):
    tokenizer = server.engine.tokenizer
    free = client.post("/generate", json={"inputs": "def add(a, b):\n", "parameters": {
        "max_new_tokens": 12, "details": True}}).json()
    generated = free["generated_text"]
    assert len(generated) >= 4
    # A stop string made of the text's last part: every token before it is held back a while.
    stop = generated[len(generated) // 2:]
    answer = client.post("/generate", json={"inputs": "def add(a, b):\n", "parameters": {
        "max_new_tokens": 12, "details": True, "stop": [stop]}}).json()
    tokens = answer["details"]["tokens"]
    assert answer["generated_text"] == generated[:generated.index(stop)]
    assert answer["details"]["finish_reason"] == "stop_sequence"
    ids = [t["id"] for t in tokens]
    assert "".join(t["text"] for t in tokens) == tokenizer.decode(ids)
    assert all(t["text"] for t in tokens if tokenizer.decode([t["id"]]).strip("\ufffd"))
    # huggingface_hub reads the same details.
    hub = InferenceClient(model=server.url).text_generation("def add(a, b):\n", max_new_tokens=12, details=True,
                                                            stop=[stop])
    assert [t.text for t in hub.details.tokens] == [t["text"] for t in tokens]


def test_llm_ls_nested_parameters_are_honoured(client):
    nested = {"inputs": "def f(x):\n", "parameters": {"parameters": {"max_new_tokens": 3, "details": True,
                                                                     "return_full_text": False}}}
    answer = client.post("/generate", json=nested).json()
    assert answer["details"]["generated_tokens"] <= 3
    outer = {"inputs": "def f(x):\n", "parameters": {"max_new_tokens": 3, "details": True,
                                                     "parameters": {"return_full_text": False}}}
    again = client.post("/generate", json=outer).json()
    # The repeat reuses the cached prompt and verifies prompt-lookup guesses: the same tokens, and
    # log-probabilities equal up to float rounding.
    for token in answer["details"]["tokens"] + again["details"]["tokens"]:
        token["logprob"] = round(token["logprob"], 4)
    assert again == answer
    conflict = {"inputs": "x", "parameters": {"max_new_tokens": 3, "parameters": {"max_new_tokens": 60}}}
    response = client.post("/generate", json=conflict)
    assert response.status_code == 422 and "given twice" in response.json()["error"]


def test_429_carries_retry_after(tiny_checkpoint):
    import threading

    from serving import running
    from stablecode.server import create_app

    app = create_app(tiny_checkpoint, max_batch=1, max_queue=1, speculative=0)
    with running(app) as server, slowed(server.engine, 0.05), httpx.Client(base_url=server.url, timeout=60) as c:
        responses = []

        def one():
            with httpx.Client(base_url=server.url, timeout=60) as own:
                responses.append(own.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 40}}))

        threads = [threading.Thread(target=one) for _ in range(2)]  # the row and the one waiting place
        for t in threads:
            t.start()
        assert wait_for(lambda: server.scheduler.active + server.scheduler.waiting >= 2, 20)
        refused = [c.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}),
                   c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}),
                   c.post("/api/generate", json={"prompt": "x", "stream": False})]
        for t in threads:
            t.join(60)
    for response in refused:
        assert response.status_code == 429, response.text
        assert int(response.headers["Retry-After"]) >= 1
    assert [r.status_code for r in responses] == [200, 200]


def test_openai_malformed_json_error_names_no_parameter(client):
    response = client.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": ',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] is None and "not valid JSON" in error["message"]
    wrong_type = client.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}).json()["error"]
    assert wrong_type["param"] == "max_tokens"
