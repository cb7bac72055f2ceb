"""Replay an editing session against a completion server: the requests llm-ls sends while a person types.

A real source file is typed a few characters at a time from a point in its middle (the code after
that point is the document's rest, the FIM suffix). Before each completion the script builds the
prompt as llm-ls does (its `build_prompt`): with FIM, lines alternately before and after the
cursor until `--context-window` tokens are used, wrapped as `<fim_prefix>before<fim_suffix>after
<fim_middle>`; without FIM, lines before the cursor only. Each completion goes to the TGI
`/generate_stream` route with `max_new_tokens` 60 (llm-ls uses `/generate`; the stream gives the
time of the first token too), or to llama.cpp's `/completion` with `cache_prompt`.

Reported per configuration: time to first token and to the whole completion, p50/p95, over all
keystrokes and over those whose prompt only extends the previous one; and the same for several
sessions typing concurrently. With `--serve`, the script starts `stablecode serve` once per
configuration (prefix reuse and speculation on/off) and compares them in one run; the decode
step of the run without speculation is the yardstick for "first token within 2 decode steps".

Usage:
  python scripts/bench/editor.py --serve "--model stablecode-nano" --keystrokes 60
  python scripts/bench/editor.py --url http://127.0.0.1:8080 --keystrokes 40      # a server already running
  python scripts/bench/editor.py --llamacpp /path/llama-server --gguf model-q8_0.gguf --keystrokes 20
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from stablecode.machine import describe_cpu

ROOT = Path(__file__).resolve().parents[2]
FIM = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
# Configurations of the server, as `stablecode serve` options.
CONFIGS = {
    "default": [],  # prefix reuse on, speculation "auto" (kept where a drafted pass is measured cheap)
    "reuse+speculation": ["--speculative", "8"],
    "reuse": ["--speculative", "0"],
    "speculation": ["--prefix-cache-mb", "0", "--speculative", "8"],
    "neither": ["--prefix-cache-mb", "0", "--speculative", "0"],
    "int8-kv": ["--kv-cache", "int8"],  # the default with an int8 KV cache
}


def default_files() -> list[Path]:
    """sortedcontainers 2.4.0: a held-out package of stablecode-nano (configs/nano/heldout-packages.txt),
    not in CPython's standard library either (the corpus of the first embedded model)."""
    import importlib.util

    spec = importlib.util.find_spec("sortedcontainers")
    if spec is None or spec.origin is None:
        raise SystemExit("sortedcontainers is not installed: pip install sortedcontainers==2.4.0, or give --file")
    package = Path(spec.origin).parent
    return [package / name for name in ("sortedset.py", "sorteddict.py", "sortedlist.py", "__init__.py")]


# ---- llm-ls's prompt ---------------------------------------------------------------------------

def build_prompt(text: str, cursor: int, count, context_window: int, fim: bool) -> str:
    """The prompt llm-ls builds for a cursor at character `cursor` of `text` (count: tokens of a string)."""
    lines = text.splitlines(keepends=True) or [""]
    row, start = 0, 0
    for row, line in enumerate(lines):  # the cursor's line and where it starts
        if start + len(line) > cursor or row == len(lines) - 1:
            break
        start += len(line)
    column = cursor - start
    before_lines = [lines[row][:column]] + lines[:row][::-1]
    if not fim:
        remaining, before = context_window, []
        for line in before_lines:
            tokens = count(line)
            if tokens > remaining:
                break
            remaining -= tokens
            before.append(line)
        return "".join(reversed(before))
    after_lines = [lines[row][column:]] + lines[row + 1:]
    remaining, before, after = context_window - 3, [], []
    for i in range(max(len(before_lines), len(after_lines))):
        if i < len(before_lines):
            tokens = count(before_lines[i])
            if tokens > remaining:
                break
            remaining -= tokens
            before.append(before_lines[i])
        if i < len(after_lines):
            tokens = count(after_lines[i])
            if tokens > remaining:
                break
            remaining -= tokens
            after.append(after_lines[i])
    return f"{FIM[0]}{''.join(reversed(before))}{FIM[1]}{''.join(after)}{FIM[2]}"


def keystroke_prompts(path: Path, start: float, keystrokes: int, chars: int, count, context_window: int,
                      fim: bool) -> list[str]:
    """Prompts before each keystroke of typing `keystrokes * chars` characters from `start` (a fraction
    of the file, moved to a line start); the rest of the file after the typed part is the suffix."""
    text = path.read_text(encoding="utf-8")
    begin = text.rfind("\n", 0, int(len(text) * start)) + 1
    typed = text[begin:begin + keystrokes * chars]
    rest = text[begin + len(typed):]
    prompts = []
    for k in range(1, keystrokes + 1):
        document = text[:begin] + typed[:k * chars] + rest
        prompts.append(build_prompt(document, begin + k * chars, count, context_window, fim))
    return prompts


# ---- clients -----------------------------------------------------------------------------------

def tgi_request(client: httpx.Client, prompt: str, args) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the end, tokens) of one streamed completion."""
    parameters = {"max_new_tokens": args.new_tokens}
    if args.sampling == "llm-vscode":
        parameters.update(temperature=0.2, top_p=0.95)
    started = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", "/generate_stream", json={"inputs": prompt, "parameters": parameters}) as response:
        if response.status_code != 200:
            raise SystemExit(f"the server answered {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise SystemExit(f"the server failed: {event['error']}")
            if event.get("token"):
                tokens += 1
                if first is None:
                    first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started, time.perf_counter() - started, tokens


def llamacpp_request(client: httpx.Client, prompt: str, args) -> tuple[float, float, int]:
    body = {"prompt": prompt, "n_predict": args.new_tokens, "cache_prompt": True, "stream": True,
            "temperature": 0.0 if args.sampling == "greedy" else 0.2, "top_p": 1.0 if args.sampling == "greedy" else 0.95,
            "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "ignore_eos": False}
    started = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", "/completion", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"llama.cpp answered {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event.get("content") or (not event.get("stop") and "content" in event):
                tokens += 1
                if first is None:
                    first = time.perf_counter() - started
            if event.get("stop"):
                break
    return first if first is not None else time.perf_counter() - started, time.perf_counter() - started, tokens


def replay(url: str, sessions: list[list[str]], args, request) -> list[dict]:
    """Each session types its keystrokes one after another (waiting for each completion); sessions
    run concurrently. Returns one record per keystroke."""

    def one(index: int) -> list[dict]:
        records, previous = [], None
        with httpx.Client(base_url=url, timeout=600) as client:
            for prompt in sessions[index]:
                ttft, total, tokens = request(client, prompt, args)
                records.append({"session": index, "ttft": ttft, "total": total, "tokens": tokens,
                                "extends": previous is not None and only_typed_at_cursor(previous, prompt),
                                "prompt_chars": len(prompt)})
                previous = prompt
        return records

    with ThreadPoolExecutor(len(sessions)) as pool:
        return [r for rs in pool.map(one, range(len(sessions))) for r in rs]


def only_typed_at_cursor(previous: str, prompt: str) -> bool:
    """Whether `prompt` is `previous` with characters added at the cursor (the window did not move)."""
    if FIM[1] in prompt:
        before, after = prompt.split(FIM[1], 1)
        previous_before, previous_after = previous.split(FIM[1], 1)
        return before.startswith(previous_before) and after == previous_after
    return prompt.startswith(previous)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))] if values else float("nan")


def summary(records: list[dict]) -> dict:
    extending = [r for r in records[1:] if r["extends"]]
    out = {"keystrokes": len(records), "extending": len(extending)}
    for name, rows in (("all", records), ("extending", extending)):
        for key in ("ttft", "total"):
            values = [r[key] for r in rows]
            out[f"{name}_{key}_p50_ms"] = round(percentile(values, 0.5) * 1e3, 1)
            out[f"{name}_{key}_p95_ms"] = round(percentile(values, 0.95) * 1e3, 1)
    steps = [(r["total"] - r["ttft"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    out["inter_token_p50_ms"] = round(statistics.median(steps) * 1e3, 1) if steps else None
    return out


# ---- servers -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, path: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def serve(serve_args: list[str], threads: int, max_batch: int):
    port = free_port()
    command = [sys.executable, "-c", "import sys; from stablecode.cli import main; sys.argv[0] = 'stablecode'; main()",
               "serve", "--port", str(port), "--threads", str(threads), "--no-index", "--max-batch", str(max_batch),
               "--log-level", "warning", *serve_args]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process, "/health")
    return process, url


def serve_llamacpp(binary: str, gguf: str, threads: int, parallel: int):
    port = free_port()
    command = [binary, "-m", gguf, "--port", str(port), "-t", str(threads), "-c", str(4096 * parallel),
               "-np", str(parallel), "-b", "512"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process, "/health")
    return process, url


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---- main --------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running `stablecode serve`")
    target.add_argument("--serve", metavar="ARGS", help="start `stablecode serve ARGS` for each configuration")
    target.add_argument("--llamacpp", metavar="LLAMA_SERVER", help="llama.cpp's llama-server binary (with --gguf)")
    parser.add_argument("--gguf", help="the GGUF model for --llamacpp")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"with --serve: of {', '.join(CONFIGS)}")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json llm-ls counts the window with (default: the model's, or stablecode-nano's)")
    parser.add_argument("--file", type=Path, action="append", default=None,
                        help="source file(s) to type (default: sortedcontainers' modules); session i types file i")
    parser.add_argument("--start", type=float, default=0.5, help="where typing starts, as a fraction of the file")
    parser.add_argument("--keystrokes", type=int, default=40)
    parser.add_argument("--chars", type=int, default=3, help="characters typed per keystroke")
    parser.add_argument("--context-window", type=int, default=1024, help="llm-ls's context_window (tokens)")
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--fim", default="on,off", help="on, off or on,off")
    parser.add_argument("--sessions", default="1,4", help="concurrent editing sessions, e.g. 1,4")
    parser.add_argument("--sampling", default="greedy", choices=["greedy", "llm-vscode"],
                        help="greedy, or llm-vscode's defaults (temperature 0.2, top-p 0.95: no speculation)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the records and summaries as JSON here")
    args = parser.parse_args()
    # SIGTERM (a timeout) ends the run through the `finally` that stops the servers it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from stablecode.tokenizer import load_tokenizer

    tokenizer_path = args.tokenizer
    if tokenizer_path is None:
        from stablecode.registry import resolve_model_dir

        model = None
        if args.serve:
            words = args.serve.split()
            model = words[words.index("--model") + 1] if "--model" in words else None
        tokenizer_path = resolve_model_dir(model)
    tokenizer = load_tokenizer(tokenizer_path)

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    files = args.file or default_files()
    sessions_counts = [int(s) for s in args.sessions.split(",")]
    fims = [f == "on" for f in args.fim.split(",")]
    print(f"CPU: {describe_cpu()}")
    print(f"files: {', '.join(str(f) for f in files)}; {args.keystrokes} keystrokes of {args.chars} characters "
          f"from {args.start:.0%}; window {args.context_window} tokens; {args.new_tokens} new tokens; {args.sampling}")
    prompts = {(fim, i): keystroke_prompts(files[i % len(files)], args.start, args.keystrokes, args.chars, count,
                                           args.context_window, fim)
               for fim in fims for i in range(max(sessions_counts))}
    if args.serve:
        targets = [(name, CONFIGS[name]) for name in args.configs.split(",")]
    else:
        targets = [("llama.cpp" if args.llamacpp else "server", None)]
    results = []
    for name, options in targets:
        for n in sessions_counts:
            if args.serve:
                process, url = serve(args.serve.split() + options, args.threads, max(sessions_counts))
            elif args.llamacpp:
                process, url = serve_llamacpp(args.llamacpp, args.gguf, args.threads, n)
            else:
                process, url = None, args.url
            request = llamacpp_request if args.llamacpp else tgi_request
            runs = fims
            if not args.llamacpp and True in fims and not httpx.get(url + "/info").json().get("fill_in_the_middle"):
                print(f"{name}: the model was not trained for fill-in-the-middle; FIM on skipped")
                runs = [f for f in fims if not f]
            try:
                for fim in runs:
                    # Warm-up on another part of the file: kernels built, allocator settled.
                    replay(url, [keystroke_prompts(files[0], 0.1, 2, args.chars, count, args.context_window, fim)],
                           args, request)
                    records = replay(url, [prompts[(fim, i)] for i in range(n)], args, request)
                    row = {"config": name, "sessions": n, "fim": fim, **summary(records)}
                    results.append({**row, "records": records})
                    print(json.dumps(row), flush=True)
                    if args.out:  # after every replay: a run cut short keeps what it measured
                        save(args.out, args, results)
            finally:
                if process is not None:
                    stop(process)
    print()
    print(f"{'config':<20}{'sess':>5}{'fim':>5}{'ttft p50':>10}{'ttft p95':>10}{'ext p50':>9}{'total p50':>11}"
          f"{'total p95':>11}{'step ms':>9}")
    for r in results:
        print(f"{r['config']:<20}{r['sessions']:>5}{'on' if r['fim'] else 'off':>5}{r['all_ttft_p50_ms']:>10}"
              f"{r['all_ttft_p95_ms']:>10}{r['extending_ttft_p50_ms']:>9}{r['all_total_p50_ms']:>11}"
              f"{r['all_total_p95_ms']:>11}{r['inter_token_p50_ms'] or '-':>9}")
    # The targets, as ratios within this run.
    by = {(r["config"], r["sessions"], r["fim"]): r for r in results}
    for fim in fims:
        plain = by.get(("reuse", 1, fim)) or by.get(("neither", 1, fim))
        best = (by.get(("default", 1, fim)) or by.get(("reuse+speculation", 1, fim)) or by.get(("server", 1, fim))
                or by.get(("llama.cpp", 1, fim)))
        if plain and best and plain["inter_token_p50_ms"]:
            print(f"FIM {'on' if fim else 'off'}: prompt-extending keystroke TTFT p50 {best['extending_ttft_p50_ms']} ms"
                  f" = {best['extending_ttft_p50_ms'] / plain['inter_token_p50_ms']:.2f} decode steps "
                  f"({plain['inter_token_p50_ms']} ms, {plain['config']}) [target <= 2]")
        for config in {r["config"] for r in results}:
            one, four = by.get((config, 1, fim)), by.get((config, max(sessions_counts), fim))
            if one and four and four is not one:
                print(f"FIM {'on' if fim else 'off'}, {config}: {four['sessions']} sessions' TTFT p95 "
                      f"{four['all_ttft_p95_ms']} ms = {four['all_ttft_p95_ms'] / one['all_ttft_p95_ms']:.2f}x one "
                      f"session's {one['all_ttft_p95_ms']} ms [target <= 3]")


def save(path: Path, args, results: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"cpu": describe_cpu(), "args": {k: str(v) for k, v in vars(args).items()},
                               "results": results}, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
