"""The completion routes' `attribution` option, and `stablecode serve`'s default index.

The index is built from a corpus holding text the tiny random model really generates greedily, so
a real request through the server reproduces an indexed file and must be attributed to it."""

import json
import shutil

import httpx
import openai
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving import running
from stablecode.attribution import Attributor, AttributionIndexError, build_index
from stablecode.server import create_app
from stablecode.server.cli import serving_attributor

MAX_NEW_TOKENS = 80
CANDIDATE_PROMPTS = ["class Foo:\n", "def add(a, b):\n", "x", "for i in range(10):\n    ", "x = 1"]
HEADER = "# generated below\n"
FOOTER = "\n# end of the generated part\n"
REPOSITORY, PATH = "owner/generated", "pkg/generated.py"


@pytest.fixture(scope="module")
def generated(tiny_checkpoint, one_torch_thread):
    """(prompt, greedy completion) of the tiny checkpoint with at least 100 non-blank characters."""
    from stablecode import Completer

    completer = Completer(tiny_checkpoint)
    for prompt in CANDIDATE_PROMPTS:
        text = completer.complete(prompt, max_new_tokens=MAX_NEW_TOKENS).text
        if len(text.strip()) >= 100:
            return prompt, text
    pytest.fail(f"no prompt of {CANDIDATE_PROMPTS} gives 100 non-blank characters in {MAX_NEW_TOKENS} tokens")


@pytest.fixture(scope="module")
def index(generated, tmp_path_factory):
    """An index of two files: one holding the completion between lines of its own, one unrelated."""
    root = tmp_path_factory.mktemp("attribution")
    content = HEADER + generated[1] + FOOTER
    other = "".join(f"def handler_{i}(request):\n    return dispatch(request, 'route_{i}')\n" for i in range(10))
    rows = [{"content": other, "max_stars_repo_name": "someone/else", "max_stars_repo_path": "app/handlers.py",
             "max_stars_count": 1, "id": "other"},
            {"content": content, "max_stars_repo_name": REPOSITORY, "max_stars_repo_path": PATH,
             "max_stars_count": 2, "id": "generated"}]
    (root / "corpus" / "python").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "corpus" / "python" / "train-00000-of-00001.parquet")
    build_index(root / "corpus", root / "index", workers=1)
    return root / "index"


@pytest.fixture(scope="module")
def attributed(tiny_checkpoint, index, one_torch_thread):
    with running(create_app(tiny_checkpoint, max_batch=2, attributor=Attributor(index))) as s:
        yield s


@pytest.fixture
def client(attributed):
    with httpx.Client(base_url=attributed.url, timeout=60) as c:
        yield c


def assert_attributes_completion(attribution: dict, text: str, completion: str, offset: int = 0) -> None:
    """`attribution` of `text` reports exactly `completion` (found at `offset` in `text`), up to
    whitespace at its ends, as characters of the generated file."""
    start = offset + len(completion) - len(completion.lstrip())
    end = offset + len(completion.rstrip())
    assert attribution["spans"] == [[start, end]]
    [source] = attribution["sources"]
    assert (source["repository"], source["path"], source["span"]) == (REPOSITORY, PATH, 0)
    assert (source["start"], source["end"]) == (start, end)
    in_file = len(HEADER) + start - offset
    assert (source["source_start"], source["source_end"]) == (in_file, in_file + end - start)
    assert text[start:end] == completion.strip()


def test_tgi_generate_returns_the_attribution(client, generated):
    prompt, completion = generated
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "attribution": True}}
    answer = client.post("/generate", json=body).json()
    assert answer["generated_text"] == completion
    assert_attributes_completion(answer["attribution"], completion, completion)
    [listed] = client.post("/", json=body).json()
    assert listed == answer
    full = client.post("/generate", json={**body, "parameters": {**body["parameters"], "return_full_text": True}})
    assert full.json()["generated_text"] == prompt + completion  # offsets into the text returned
    assert_attributes_completion(full.json()["attribution"], prompt + completion, completion, offset=len(prompt))


def test_tgi_stream_attaches_it_to_the_last_event(client, generated):
    prompt, completion = generated
    with client.stream("POST", "/generate_stream", json={
            "inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "attribution": True}}) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert all("attribution" not in e for e in events[:-1])
    assert events[-1]["generated_text"] == completion
    assert_attributes_completion(events[-1]["attribution"], completion, completion)


def test_openai_choices_carry_the_attribution(attributed, generated):
    prompt, completion = generated
    oa = openai.OpenAI(base_url=attributed.url + "/v1", api_key="none", max_retries=0, timeout=60)
    answer = oa.completions.create(model="m", prompt=[prompt, prompt], max_tokens=MAX_NEW_TOKENS, temperature=0,
                                   echo=True, extra_body={"attribution": True})
    assert len(answer.choices) == 2
    for choice in answer.choices:
        assert choice.text == prompt + completion
        assert_attributes_completion(choice.model_extra["attribution"], choice.text, completion, offset=len(prompt))
    chunks = list(oa.completions.create(model="m", prompt=prompt, max_tokens=MAX_NEW_TOKENS, temperature=0,
                                        stream=True, extra_body={"attribution": True}))
    assert "".join(c.choices[0].text for c in chunks) == completion
    [last] = [c.choices[0] for c in chunks if c.choices[0].finish_reason]
    assert_attributes_completion(last.model_extra["attribution"], completion, completion)
    assert all("attribution" not in (c.choices[0].model_extra or {}) for c in chunks if not c.choices[0].finish_reason)


def test_ollama_answer_carries_the_attribution(client, generated):
    prompt, completion = generated
    body = {"model": "m", "prompt": prompt, "attribution": True,
            "options": {"num_predict": MAX_NEW_TOKENS, "temperature": 0}}
    answer = client.post("/api/generate", json={**body, "stream": False}).json()
    assert answer["response"] == completion
    assert_attributes_completion(answer["attribution"], completion, completion)
    with client.stream("POST", "/api/generate", json=body) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["done"] and "attribution" not in lines[0]
    assert_attributes_completion(lines[-1]["attribution"], completion, completion)


def test_attribution_is_off_by_default(client, attributed, index):
    short = {"inputs": "x", "parameters": {"max_new_tokens": 3}}
    assert "attribution" not in client.post("/generate", json=short).json()
    choice = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).json()["choices"][0]
    assert "attribution" not in choice
    assert "attribution" not in client.post("/api/generate", json={"prompt": "x", "stream": False}).json()
    assert client.get("/info").json()["attribution_index"] == str(index)


def test_attribution_without_an_index_is_a_clear_4xx(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for route in ("/generate", "/generate_stream", "/"):
            answer = c.post(route, json={"inputs": "x", "parameters": {"attribution": True}})
            assert answer.status_code == 422, route
            assert "no attribution index" in answer.json()["error"] and "--index" in answer.json()["error"]
        answer = c.post("/v1/completions", json={"prompt": "x", "attribution": True, "stream": True})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "attribution"
        assert "no attribution index" in answer.json()["error"]["message"]
        answer = c.post("/api/generate", json={"prompt": "x", "attribution": True})
        assert answer.status_code == 400 and "no attribution index" in answer.json()["error"]
        assert c.get("/info").json()["attribution_index"] is None
        # without the option the same server completes as before
        answer = c.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
        assert answer.status_code == 200 and "attribution" not in answer.json()


def test_a_corrupted_index_fails_the_request_not_the_server(client, attributed, index, generated, tmp_path,
                                                            monkeypatch):
    damaged = tmp_path / "index"
    shutil.copytree(index, damaged)
    texts = bytearray((damaged / "texts.bin").read_bytes())
    for i in range(0, len(texts), 7):  # sizes still match, the zlib streams do not
        texts[i] ^= 0xFF
    (damaged / "texts.bin").write_bytes(bytes(texts))
    monkeypatch.setattr(attributed.engine, "attributor", Attributor(damaged, verify=False))
    prompt, _ = generated
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "attribution": True}}
    answer = client.post("/generate", json=body)
    assert answer.status_code == 500 and "attribution failed" in answer.json()["error"]
    with client.stream("POST", "/generate_stream", json=body) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert "attribution failed" in events[-1]["error"]
    assert client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_serve_loads_the_embedded_models_index_by_default(tiny_checkpoint, index, tmp_path, monkeypatch, capsys):
    import stablecode.registry

    monkeypatch.setattr(stablecode.registry, "EMBEDDED_MODELS_DIR", tmp_path / "models")
    embedded = tmp_path / "models" / "stablecode-nano"
    shutil.copytree(tiny_checkpoint, embedded)
    # not installed: serve without it, and say so on one line
    assert serving_attributor(None, None) is None
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "serving without attribution" in message and "not installed" in message
    shutil.copytree(index, embedded / "attribution-index")
    for model in (None, "stablecode-nano", embedded):
        assert serving_attributor(model, None).directory == embedded / "attribution-index"
    assert serving_attributor(None, None, no_index=True) is None
    assert serving_attributor(tiny_checkpoint, None) is None  # another model: its corpus is not this index
    assert serving_attributor(tiny_checkpoint, index).directory == index
    assert capsys.readouterr().err == ""
    (embedded / "attribution-index" / "hashes.npy").write_bytes(b"damaged")
    with pytest.raises(AttributionIndexError):  # installed but damaged: an error, not a silent fallback
        serving_attributor(None, None)


def test_serve_command_refuses_index_with_no_index(tmp_path, capsys):
    from stablecode.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--index", str(tmp_path), "--no-index"])
    assert "not allowed with argument" in capsys.readouterr().err
