"""Continuous batching: concurrent requests share decode steps without changing their results,
a full server refuses at once, a client that goes away frees its slot at once, and the server
survives a failing model and reports loading."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serving import PROMPTS, running, slowed, wait_for
from stablecode.errors import CheckpointError
from stablecode.server import create_app


def _generate(url, prompt, max_new_tokens, **parameters):
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, **parameters}}
    response = httpx.post(url + "/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


def test_batched_output_equals_one_at_a_time(server, reference):
    jobs = [(prompt, 8 + 9 * i) for i, prompt in enumerate(PROMPTS)]  # different lengths: rows leave and join
    alone = [_generate(server.url, p, n) for p, n in jobs]
    assert alone == [reference(p, n) for p, n in jobs]  # one at a time, the server is the library
    before = server.scheduler.stats()["rows_per_step"]
    with slowed(server.engine, 0.005), ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _generate(server.url, *job), jobs))
    assert together == alone
    after = server.scheduler.stats()["rows_per_step"]
    batched_steps = sum(count - before.get(rows, 0) for rows, count in after.items() if rows > 1)
    assert batched_steps > 0, after  # concurrent requests really shared decode steps
    assert max(after) > 1


def test_seeded_sampling_is_unchanged_by_batching(server):
    jobs = [(prompt, 20, {"do_sample": True, "temperature": 0.9, "top_k": 50, "seed": 1234 + i})
            for i, prompt in enumerate(PROMPTS[:4])]
    alone = [_generate(server.url, p, n, **kw) for p, n, kw in jobs]
    with slowed(server.engine, 0.005), ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _generate(server.url, job[0], job[1], **job[2]), jobs))
    assert together == alone


def test_one_request_with_several_prompts_is_one_batch(server, reference):
    before = server.scheduler.stats()["rows_per_step"].get(4, 0)
    answer = httpx.post(server.url + "/v1/completions", timeout=60,
                        json={"prompt": PROMPTS[:4], "max_tokens": 10, "temperature": 0}).json()
    assert [c["text"] for c in answer["choices"]] == [reference(p, 10) for p in PROMPTS[:4]]
    assert server.scheduler.stats()["rows_per_step"].get(4, 0) > before


@pytest.fixture
def small_server(tiny_checkpoint):
    """One row and one waiting place, with a model slowed to 20 ms a step (a long generation lasts seconds:
    without speculation, which on the looping random model would accept several tokens a step)."""
    with running(create_app(tiny_checkpoint, max_batch=1, max_queue=1, speculative=0)) as s, slowed(s.engine, 0.02):
        yield s


class OpenStream:
    """A TGI stream whose first event has been read and which is left open (unread) until close()."""

    def __init__(self, client, body):
        self.response = client.send(client.build_request("POST", "/generate_stream", json=body), stream=True)
        assert self.response.status_code == 200
        # Keep the line iterator referenced: a discarded one closes the response when collected.
        self.lines = self.response.iter_lines()
        first = next(self.lines)
        assert json.loads(first[len("data:"):])["index"] == 1

    def close(self):
        self.response.close()


LONG = {"inputs": "def f(x):\n", "parameters": {"max_new_tokens": 200}}


def test_saturated_server_answers_429_at_once(small_server):
    s = small_server
    answers = []
    with httpx.Client(base_url=s.url, timeout=30) as c:
        running_stream = OpenStream(c, LONG)
        short = {"inputs": "x = ", "parameters": {"max_new_tokens": 10}}
        waiting = threading.Thread(target=lambda: answers.append(httpx.post(s.url + "/generate", json=short,
                                                                            timeout=30)))
        waiting.start()
        assert wait_for(lambda: s.scheduler.active == 1 and s.scheduler.waiting == 1)
        started = time.monotonic()
        refused = httpx.post(s.url + "/generate", json=LONG, timeout=30)
        assert time.monotonic() - started < 2.0
        assert refused.status_code == 429
        assert refused.json()["error_type"] == "overloaded"
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError, match="busy"):
            client.completions.create(model="m", prompt="x", max_tokens=5)
        running_stream.close()
    waiting.join(30)
    assert answers[0].status_code == 200  # the waiting request got the row once it was free
    assert wait_for(lambda: s.scheduler.active == 0 and s.scheduler.waiting == 0)


def test_disconnect_mid_stream_frees_the_slot(small_server):
    s = small_server
    before = s.scheduler.stats()
    with httpx.Client(base_url=s.url, timeout=30) as c:
        response = OpenStream(c, LONG)
        assert s.scheduler.active == 1
        response.close()
    assert wait_for(lambda: s.scheduler.active == 0, timeout=2.0)
    after = s.scheduler.stats()
    assert after["cancelled_requests"] == before["cancelled_requests"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 100  # stopped long before 200 tokens


def _abandon(server, path: str, body: dict, until) -> None:
    """POST over a raw socket and close it once `until()` holds (the request queued or generating):
    a client timeout instead could fire before a loaded machine even queued the request."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert wait_for(until, timeout=20)


@pytest.mark.parametrize("path, body", [
    ("/generate", LONG),
    ("/v1/completions", {"prompt": "def f(x):\n", "max_tokens": 200}),
    ("/api/generate", {"prompt": "def f(x):\n", "stream": False, "options": {"num_predict": 200}}),
])
def test_disconnect_while_waiting_or_running_frees_the_slot(small_server, path, body):
    s = small_server
    before = s.scheduler.stats()["cancelled_requests"]
    with httpx.Client(base_url=s.url, timeout=30) as c:
        running_stream = OpenStream(c, LONG)
        # A non-streaming request that waits for the only row; its client gives up.
        _abandon(s, path, body, lambda: s.scheduler.waiting == 1)
        assert wait_for(lambda: s.scheduler.waiting == 0, timeout=5.0)
        assert s.scheduler.active == 1
        running_stream.close()
    assert wait_for(lambda: s.scheduler.active == 0, timeout=5.0)
    # A non-streaming request that got the row, abandoned mid-generation.
    generated = s.scheduler.stats()["generated_tokens"]
    _abandon(s, path, body, lambda: s.scheduler.active == 1 and s.scheduler.stats()["generated_tokens"] > generated)
    assert wait_for(lambda: s.scheduler.active == 0, timeout=5.0)
    assert s.scheduler.stats()["cancelled_requests"] == before + 3


def test_a_failing_model_fails_the_request_not_the_server(server):
    model = server.engine.model
    forward = model.forward
    calls = []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated kernel failure")
        return forward(*args, **kwargs)

    model.forward = failing_forward
    try:
        response = httpx.post(server.url + "/generate", json=LONG, timeout=30)
    finally:
        del model.forward
    assert response.status_code == 500
    assert "simulated kernel failure" in response.json()["error"]
    assert server.scheduler.active == 0
    assert _generate(server.url, "x = ", 4) is not None


def test_health_is_503_while_loading_then_200(tiny_checkpoint, monkeypatch):
    import stablecode.server.engine as engine_module

    gate = threading.Event()
    load_model = engine_module.load_model

    def slow_load(*args, **kwargs):
        gate.wait(30)
        return load_model(*args, **kwargs)

    monkeypatch.setattr(engine_module, "load_model", slow_load)
    with running(create_app(tiny_checkpoint), wait_ready=False) as s:
        loading = httpx.get(s.url + "/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = httpx.post(s.url + "/generate", json={"inputs": "x"})
        assert early.status_code == 503 and "loading" in early.json()["error"]
        assert httpx.get(s.url + "/info").json()["state"] == "loading"
        gate.set()
        assert s.engine.wait_until_loaded(30)
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.post(s.url + "/generate", json={"inputs": "x"}).status_code == 200


def test_failed_load_is_reported(tiny_checkpoint, monkeypatch):
    import stablecode.server.engine as engine_module

    def broken_load(*args, **kwargs):
        raise CheckpointError("model.safetensors: corrupted or truncated safetensors file")

    monkeypatch.setattr(engine_module, "load_model", broken_load)
    with running(create_app(tiny_checkpoint), wait_ready=False) as s:
        s.engine.wait_until_loaded(30)
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and "corrupted" in health.json()["error"]
        answer = httpx.post(s.url + "/v1/completions", json={"prompt": "x"})
        assert answer.status_code == 503 and "corrupted" in answer.json()["error"]["message"]


def test_bad_model_path_fails_before_serving(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        create_app(tmp_path / "missing")
