"""`stablecode serve` as a user runs it: a real process on a free localhost port."""

import signal
import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_runs_answers_and_stops(tiny_checkpoint):
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "stablecode.cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port),
         "--threads", "1", "--max-batch", "2", "--api-key", "k3y", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer k3y"}
        info = httpx.get(url + "/info", headers=headers).json()
        assert info["max_batch"] == 2 and info["model_dir"] == str(tiny_checkpoint)
        answer = httpx.post(url + "/generate", headers=headers,
                            json={"inputs": "def f(x):\n", "parameters": {"max_new_tokens": 5}})
        assert answer.status_code == 200 and isinstance(answer.json()["generated_text"], str)
        assert httpx.post(url + "/generate", json={"inputs": "x"}).status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output


def test_serve_command_rejects_a_bad_model_at_once(tmp_path, capsys):
    from stablecode.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope"), "--port", str(_free_port())]) == 2
    error = capsys.readouterr().err
    assert "no such checkpoint" in error and "Traceback" not in error
