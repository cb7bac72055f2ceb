"""Helpers for the server tests: a real uvicorn server on a free 127.0.0.1 port in a background
thread of the test process (so tests can also watch the scheduler's counters), and ways to make
the served model slow."""

import socket
import threading
import time
from contextlib import contextmanager

from stablecode.server import http


class RunningServer:
    """The app served as `stablecode serve` serves it (stablecode.server.http), on a free port."""

    def __init__(self, app, drain_seconds: float = 1.0, **options):
        self.app = app
        self.engine = app.state.engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = http.Server(http.config(app, log_level="warning", drain_seconds=drain_seconds, **options),
                                  self.engine, drain_seconds)
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
def running(app, wait_ready: bool = True, **options):
    server = RunningServer(app, **options).start(wait_ready)
    try:
        yield server
    finally:
        server.stop()


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


PROMPTS = ["def add(a, b):\n", "for i in range(10):\n    ", "class Foo:\n    def __init__(self):\n",
           "import os\n", "héllo wörld ✓ 日本語 = ", "x = [1, 2, 3]\nprint("]
