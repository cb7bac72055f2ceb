"""Fixtures: a real uvicorn server on a free 127.0.0.1 port, in a background thread of the test
process (so tests can also watch the scheduler's counters)."""

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch
import uvicorn

from stablecode.server import create_app


class RunningServer:
    def __init__(self, app):
        self.app = app
        self.engine = app.state.engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def scheduler(self):
        return self.engine.scheduler

    def start(self, wait_ready: bool = True) -> "RunningServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        if wait_ready:
            assert self.engine.wait_until_loaded(30), self.engine.error
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@contextmanager
def running(app, wait_ready: bool = True):
    server = RunningServer(app).start(wait_ready)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matrices are too small to split: on a shared 2-core machine a second
    thread only adds contention (10x slower steps measured). Restored after each module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, one_torch_thread):
    """A server for one test module: tiny random model, 4 rows, 8 waiting."""
    with running(create_app(tiny_checkpoint, max_batch=4, max_queue=8)) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@contextmanager
def slowed(engine, seconds_per_forward: float):
    """Make every forward pass of the served model take at least this long (simulates a big model)."""
    model = engine.model
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(seconds_per_forward)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    try:
        yield
    finally:
        del model.forward


def wait_for(condition, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, one_torch_thread):
    """The library's own greedy completion of the same checkpoint, to compare server answers with."""
    from stablecode.api import Completer

    completer = Completer(tiny_checkpoint)

    def complete(prompt, max_new_tokens, **options):
        return completer.complete(prompt, max_new_tokens=max_new_tokens, **options).text

    return complete


PROMPTS = ["def add(a, b):\n", "for i in range(10):\n    ", "class Foo:\n    def __init__(self):\n",
           "import os\n", "héllo wörld ✓ 日本語 = ", "x = [1, 2, 3]\nprint("]
