"""The HTTP layer under the app: uvicorn's h11 protocol with a deadline for each request head and a
cap on open connections, a listening socket bound before anything is loaded, and a shutdown that
lets open streams finish (or ends them with a final event).

uvicorn alone has no deadline for a request whose head never completes (`timeout_keep_alive`
starts only after a response, `limit_concurrency` only when a whole head has arrived), so slow
clients could hold sockets until the process ran out of file descriptors. The body's deadline is
the app's (`app.RequestGuard`, 408), since only it sees the body arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from stablecode.errors import StablecodeError

log = logging.getLogger("stablecode.server")

DEFAULT_HEAD_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 512
FILE_DESCRIPTORS_BESIDES_CONNECTIONS = 128  # model, index, logs, torch's own


def _raw_response(status: str, message: str) -> bytes:
    body = ('{"error": "%s", "error_type": "%s"}' % (message, "overloaded" if status.startswith("503") else "timeout"))
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\nretry-after: 1\r\n\r\n{body}").encode()


class _RateLimitedWarning:
    """One log line per interval with a count, however many connections are refused: slow or
    hostile clients must not fill the log."""

    def __init__(self, message: str, interval: float = 10.0):
        self.message, self.interval = message, interval
        self.count, self.last = 0, float("-inf")

    def __call__(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            log.warning(self.message, self.count)
            self.count, self.last = 0, now


class GuardedH11Protocol(H11Protocol):
    """h11 with a deadline for each request head and a cap on open connections.

    A connection beyond `max_connections` gets a 503 and is closed at once; a request head not
    complete `head_timeout` seconds after its first byte (or after the connection opened) gets a
    408 and the connection is closed. Subclass with `protocol(head_timeout, max_connections)`.
    """

    head_timeout: float = DEFAULT_HEAD_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    _refused_warning = _RateLimitedWarning("refused %d connection(s): the connection limit is reached")
    _timeout_warning = _RateLimitedWarning("closed %d connection(s) whose request head did not arrive in time")

    def connection_made(self, transport) -> None:
        self._head_timer = None
        if len(self.server_state.connections) >= self.max_connections:
            self.transport = transport
            self.flow = None
            transport.write(_raw_response("503 Service Unavailable", "too many open connections; retry shortly"))
            transport.close()
            self._refused_warning()
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_timer is None:
            self._arm_head_timer()  # a later request on a kept-alive connection starts arriving
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.transport.write(_raw_response("408 Request Timeout",
                                           f"the request head did not arrive within {self.head_timeout:g} s"))
        self.transport.close()
        self._timeout_warning()


def protocol(head_timeout: float = DEFAULT_HEAD_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> type:
    if not head_timeout > 0:
        raise StablecodeError(f"the request head timeout must be > 0 seconds, got {head_timeout}")
    if max_connections < 1:
        raise StablecodeError(f"--max-connections must be >= 1, got {max_connections}")
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"head_timeout": head_timeout,
                                                              "max_connections": max_connections})


def ensure_file_limit(max_connections: int) -> None:
    """Raise the soft file-descriptor limit so `max_connections` sockets fit, or say it cannot."""
    needed = max_connections + FILE_DESCRIPTORS_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            raise StablecodeError(f"--max-connections {max_connections} needs {needed} file descriptors, but the "
                                  f"limit is {hard} (ulimit -n); lower --max-connections")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now, so a taken port is one clear error before anything loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise StablecodeError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise StablecodeError(f"port {port} on {host} is already in use (another server?); stop it or choose "
                                  "another --port") from None
        if e.errno == errno.EACCES:
            raise StablecodeError(f"not allowed to listen on {host}:{port} (ports below 1024 need privileges); "
                                  "choose another --port") from None
        raise StablecodeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn's server whose shutdown (SIGTERM, SIGINT) first refuses new completions, lets running
    ones finish for `drain_seconds`, then ends those still running with a final event (each API's
    error event: "the server is shutting down") before the connections close."""

    def __init__(self, config: uvicorn.Config, engine, drain_seconds: float = 5.0):
        super().__init__(config)
        self.engine = engine
        self.drain_seconds = drain_seconds

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn raises the caught signal again once shut down; a clean drain is a normal exit (status 0).
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    async def shutdown(self, sockets=None) -> None:
        self.engine.begin_shutdown()
        ending = asyncio.ensure_future(self._end_generation_after(self.drain_seconds))
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()

    async def _end_generation_after(self, seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while self.engine.busy() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.busy():
            log.warning("ending the completions still running after %.1f s of shutdown", seconds)
        await asyncio.to_thread(self.engine.stop)  # running sequences get their final "shutting down" event


def config(app, *, head_timeout: float = DEFAULT_HEAD_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS,
           drain_seconds: float = 5.0, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's config for the app, with the guarded protocol; the graceful-shutdown timeout leaves
    the final events time to go out after the drain."""
    return uvicorn.Config(app, http=protocol(head_timeout, max_connections), log_level=log_level,
                          timeout_graceful_shutdown=drain_seconds + 3, timeout_keep_alive=5)


def serve(app, sock: socket.socket, **options) -> None:
    """Run `app` on an already bound socket until SIGTERM/SIGINT."""
    drain = options.get("drain_seconds", 5.0)
    Server(config(app, **options), app.state.engine, drain).run(sockets=[sock])
