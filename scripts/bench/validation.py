"""What a refused request costs the server: a body of 650,000 empty prompts (1.95 MB, refused for
asking too many completions) against a one-prompt request refused for a bad temperature (its peer
in the same run), over HTTP to the embedded model.

    python scripts/bench/validation.py [--model DIR] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time

from stablecode.machine import describe_cpu


def main() -> None:
    import httpx
    import uvicorn

    from stablecode.server import create_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    app = create_app(args.model, max_batch=1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    app.state.engine.wait_until_loaded(300)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    bodies = {"650,000 empty prompts": json.dumps({"prompt": [""] * 650_000, "max_tokens": 1}, separators=(",", ":")),
              "1 prompt, bad temperature": json.dumps({"prompt": "x", "max_tokens": 1, "temperature": 9})}
    print(f"CPU: {describe_cpu()}")
    times = {}
    with httpx.Client(timeout=600) as client:
        for name, body in bodies.items():
            seconds = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                response = client.post(url, content=body, headers={"Content-Type": "application/json"})
                seconds.append(time.perf_counter() - started)
            times[name] = statistics.median(seconds)
            print(f"{name:28s} {len(body):>10,} bytes  HTTP {response.status_code}  median {times[name]:.3f} s")
    small, large = times["1 prompt, bad temperature"], times["650,000 empty prompts"]
    print(f"the 650,000-prompt refusal costs {large / small:.1f}x the one-prompt refusal")
    server.should_exit = True
    thread.join(10)


if __name__ == "__main__":
    main()
