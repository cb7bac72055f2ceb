"""Load test of `stablecode serve`: N concurrent editor-like clients for a fixed time.

Starts the server as a real process twice on the same model, once with continuous batching
(--max-batch N) and once one request at a time (--max-batch 1), drives each with the same
clients, and reports requests/s, generated tokens/s, time to first token and latency (p50/p99),
and errors, plus the batched / one-at-a-time throughput ratio measured in the same run.

Each client loops: take a slice of real Python source (the standard library) as the prompt,
POST /generate_stream with llm-vscode's defaults (60 new tokens, temperature 0.2, top-p 0.95),
read the stream to the end. Example:

    python scripts/bench/load_test.py                              # the embedded model, 16 clients, 60 s per phase
    python scripts/bench/load_test.py --model work/tiny --threads 1
    python scripts/bench/load_test.py --url http://127.0.0.1:8080  # an already running server (one phase)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Phase:
    name: str
    duration: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    scheduler: dict | None = None

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.duration

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.duration

    def summary(self) -> dict:
        return {"name": self.name, "duration_s": round(self.duration, 1), "requests": len(self.latencies),
                "requests_per_s": round(self.requests_per_s, 2), "tokens_per_s": round(self.tokens_per_s, 1),
                "ttft_p50_ms": _ms(_percentile(self.first_token, 50)),
                "ttft_p99_ms": _ms(_percentile(self.first_token, 99)),
                "latency_p50_ms": _ms(_percentile(self.latencies, 50)),
                "latency_p99_ms": _ms(_percentile(self.latencies, 99)),
                "errors": sum(self.errors.values()), "error_kinds": self.errors,
                "mean_rows_per_step": _mean_rows(self.scheduler),
                "decode_steps": (self.scheduler or {}).get("steps"),
                "abandoned_at_end": (self.scheduler or {}).get("cancelled"),
                "server_seconds": (self.scheduler or {}).get("seconds")}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _mean_rows(stats: dict | None) -> float | None:
    if not stats or not stats.get("rows_per_step"):
        return None
    rows = {int(k): v for k, v in stats["rows_per_step"].items()}
    return round(sum(k * v for k, v in rows.items()) / sum(rows.values()), 2)


def load_prompts(count: int, chars: int, seed: int) -> list[str]:
    """Slices of the standard library's source, ending mid-file as an editor's prefix does."""
    rng = random.Random(seed)
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    prompts = []
    while len(prompts) < count:
        text = rng.choice(files).read_text(encoding="utf-8", errors="replace")
        if len(text) < chars:
            continue
        end = rng.randrange(chars, len(text))
        prompts.append(text[end - chars:end])
    return prompts


async def client_loop(client: httpx.AsyncClient, phase: Phase, prompts: list[str], rng: random.Random,
                      parameters: dict) -> None:
    """Send requests back to back until cancelled at the end of the phase."""
    while True:
        body = {"inputs": rng.choice(prompts), "parameters": {**parameters, "seed": rng.randrange(2**31)}}
        started = time.monotonic()
        first = None
        try:
            async with client.stream("POST", "/generate_stream", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    phase.error(f"HTTP {response.status_code}")
                    await asyncio.sleep(0.1)
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        phase.error(event.get("error_type", "error"))
                        break
                    phase.tokens += 1  # counted as they arrive: the phase ends mid-request
                    if first is None:
                        first = time.monotonic() - started
                        phase.first_token.append(first)
        except httpx.HTTPError as e:
            phase.error(type(e).__name__)
            continue
        if first is not None:
            phase.latencies.append(time.monotonic() - started)


async def run_phase(url: str, name: str, clients: int, duration: float, prompts: list[str], seed: int,
                    parameters: dict, headers: dict) -> Phase:
    """`clients` concurrent clients for `duration` seconds; requests still running at the end are
    abandoned (their connections closed), so only what happened inside the window counts."""
    phase = Phase(name)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=httpx.Limits(max_connections=clients + 1)) as client:
        before = (await client.get("/info")).json()["scheduler"]
        started = time.monotonic()
        tasks = [asyncio.create_task(client_loop(client, phase, prompts, random.Random(seed + i), parameters))
                 for i in range(clients)]
        await asyncio.sleep(duration)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        phase.duration = time.monotonic() - started
        await asyncio.sleep(1.0)  # let the server notice the closed connections
        after = (await client.get("/info")).json()["scheduler"]
    rows = {k: v - before["rows_per_step"].get(k, 0) for k, v in after["rows_per_step"].items()}
    seconds = {k: round(v - before["seconds"].get(k, 0.0), 1) for k, v in after["seconds"].items()}
    phase.scheduler = {**after, "rows_per_step": rows, "seconds": seconds, "steps": after["steps"] - before["steps"],
                       "cancelled": after["cancelled_requests"] - before["cancelled_requests"]}
    return phase


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`stablecode serve` in its own process, as users run it."""

    def __init__(self, args, max_batch: int, max_queue: int):
        self.url = f"http://127.0.0.1:{_free_port()}"
        command = [sys.executable, "-m", "stablecode.cli", "serve", "--port", self.url.rsplit(":", 1)[1],
                   "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--log-level", "warning"]
        for option in ("model", "dtype", "quantize", "threads"):
            if getattr(args, option) is not None:
                command += [f"--{option}", str(getattr(args, option))]
        self.process = subprocess.Popen(command)

    def __enter__(self) -> "ServerProcess":
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with status {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become ready in 10 minutes")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def print_table(phases: list[Phase]) -> None:
    columns = ["requests", "requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms",
               "latency_p99_ms", "errors", "mean_rows_per_step", "decode_steps",
               "abandoned_at_end"]
    rows = [phase.summary() for phase in phases]
    width = max(len(c) for c in columns)
    print(f"{'':<{width}}  " + "  ".join(f"{r['name']:>16}" for r in rows))
    for column in columns:
        print(f"{column:<{width}}  " + "  ".join(f"{str(r[column]):>16}" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory or embedded name (default: embedded)")
    parser.add_argument("--url", default=None, help="load an already running server instead (one phase)")
    parser.add_argument("--api-key", default=None, help="for --url servers that need one")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--max-batch", type=int, default=8, help="rows of the batched phase")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--prompt-chars", type=int, default=1500)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    prompts = load_prompts(64, args.prompt_chars, args.seed)
    parameters = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                  "do_sample": True}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def phase(url: str, name: str) -> Phase:
        print(f"running {name}: {args.clients} clients for {args.duration:.0f} s ...", file=sys.stderr)
        return asyncio.run(run_phase(url, name, args.clients, args.duration, prompts, args.seed, parameters, headers))

    if args.url:
        phases = [phase(args.url.rstrip("/"), "server")]
    else:
        # Both phases queue every client (no 429s): only the batching differs.
        with ServerProcess(args, args.max_batch, args.clients) as server:
            batched = phase(server.url, f"batched (max {args.max_batch})")
        with ServerProcess(args, 1, args.clients) as server:
            single = phase(server.url, "one at a time")
        phases = [batched, single]
    print_table(phases)
    for phase in phases:
        print(f"{phase.name}: model thread busy (s): {phase.summary()['server_seconds']}")
    if len(phases) == 2:
        print(f"\nbatched / one-at-a-time: {phases[0].requests_per_s / phases[1].requests_per_s:.2f}x requests/s, "
              f"{phases[0].tokens_per_s / phases[1].tokens_per_s:.2f}x tokens/s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "phases": [p.summary() for p in phases]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
