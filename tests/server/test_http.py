"""The HTTP layer (stablecode.server.http and the app's guard) against real sockets: slow and
half-sent requests, too many connections, Host headers of a DNS-rebinding page, shutdown with
streams open, a port already in use."""

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serving import running, slowed, wait_for
from stablecode.server import create_app


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _read_all(s: socket.socket, timeout: float = 10) -> bytes:
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


HALF_HEAD = b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Le"


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint, one_torch_thread):
    """Short deadlines and a low connection cap, to see them work in a test's time."""
    app = create_app(tiny_checkpoint, max_batch=2, body_timeout=1.0)
    with running(app, head_timeout=1.0, max_connections=16) as server:
        yield server


def test_half_sent_requests_cannot_take_the_server_down(guarded, caplog):
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    slow = []
    for _ in range(40):  # more than the cap: the extra ones are refused at once
        s = _connect(guarded.port)
        s.sendall(HALF_HEAD)
        slow.append(s)
    answers = [_read_all(s, 15) for s in slow]
    elapsed = time.monotonic() - started
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert len(refused) >= 40 - 16 and len(refused) + len(timed_out) == 40, answers
    assert all(b"retry-after: 1" in a for a in refused)
    assert elapsed < 10  # every socket was closed by the server: refused at once or after the 1 s deadline
    for s in slow:
        s.close()
    # Normal requests are answered again, and the log holds a few lines, no tracebacks.
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        assert c.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).status_code == 200
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) <= 6 and not any(r.exc_info for r in records), [r.getMessage() for r in records]


def test_a_head_trickled_byte_by_byte_still_meets_the_deadline(guarded):
    s = _connect(guarded.port)
    started = time.monotonic()
    answer = b""
    try:
        for byte in HALF_HEAD:  # one byte each 30 ms: every byte would reset a per-read timer
            s.sendall(bytes([byte]))
            time.sleep(0.03)
            if time.monotonic() - started > 2.5:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = _read_all(s, 10)
    s.close()
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 6


def test_a_trickled_body_gets_408(guarded):
    s = _connect(guarded.port)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 200\r\n\r\n{\"prompt\": ")
    answer = _read_all(s, 10)
    s.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert "did not arrive within 1 s" in body["error"]["message"]  # OpenAI's error format for /v1/


@pytest.mark.parametrize("path, body", [("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2}}),
                                        ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                                        ("/api/generate", {"prompt": "x", "stream": False})])
def test_a_dns_rebinding_host_header_is_refused(server, path, body):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        refused = c.post(path, json=body, headers={"Host": f"attacker.example:{server.port}"})
        assert refused.status_code == 403 and "attacker.example" in refused.text and "--allow-host" in refused.text
        for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]", "LOCALHOST."):
            assert c.post(path, json=body, headers={"Host": host}).status_code == 200, host
        assert c.get("/health", headers={"Host": "attacker.example"}).status_code == 403


def test_allowed_host_names(tiny_checkpoint):
    app = create_app(tiny_checkpoint, max_batch=1, allowed_hosts=["devbox.lan"])
    with running(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/health", headers={"Host": "devbox.lan:8080"}).status_code == 200
        assert c.get("/health", headers={"Host": "other.lan"}).status_code == 403
    with running(create_app(tiny_checkpoint, max_batch=1, allowed_hosts=["*"])) as server:
        assert httpx.get(server.url + "/health", headers={"Host": "anything.example"}).status_code == 200


def _stream_events(url: str, body: dict, out: list) -> None:
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/generate_stream", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                out.append(json.loads(line[5:]))


def test_shutdown_finishes_short_streams_and_ends_long_ones_with_a_final_event(tiny_checkpoint):
    # Without speculation a slowed step is one token: the long stream cannot finish within the drain.
    app = create_app(tiny_checkpoint, max_batch=2, speculative=0)
    server = running(app, drain_seconds=1.0)
    with server as s, slowed(s.engine, 0.02):
        short, long = [], []
        threads = [threading.Thread(target=_stream_events, args=(s.url, {
            "inputs": "x", "parameters": {"max_new_tokens": n}}, out)) for n, out in ((20, short), (240, long))]
        for t in threads:
            t.start()
        assert wait_for(lambda: len(long) >= 2 and len(short) >= 2, 20)
        started = time.monotonic()
        s.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler does
        for t in threads:
            t.join(20)
        assert time.monotonic() - started < 6
        assert short[-1]["generated_text"] is not None and "error" not in short[-1]  # finished in the grace period
        assert long[-1] == {"error": "the server is shutting down", "error_type": "generation"}
        assert len(long) < 240
        assert wait_for(lambda: not s.thread.is_alive(), 10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_port_in_use_is_one_line_and_exit_2(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "stablecode.cli", "serve", "--model", str(tiny_checkpoint),
                                 "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and str(port) in lines[0], result.stderr


def test_sigterm_ends_the_serve_process_cleanly(tiny_checkpoint):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "stablecode.cli", "serve", "--model", str(tiny_checkpoint),
                                "--port", str(port), "--threads", "1", "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _ready(url) or process.poll() is not None, 90, 0.2) and process.poll() is None
        events = []
        reader = threading.Thread(target=_stream_events, args=(url, {"inputs": "x", "parameters": {
            "max_new_tokens": 250}}, events))
        reader.start()
        assert wait_for(lambda: events, 30)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        reader.join(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert events[-1].get("generated_text") is not None or events[-1].get("error") == "the server is shutting down"


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
