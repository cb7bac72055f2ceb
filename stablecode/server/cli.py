"""`stablecode serve`: run the completion server with uvicorn."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from stablecode.options import add_kv_cache_option, add_model_options, apply_threads

DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_READ_TIMEOUT = 10.0
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def add_serve_command(subparsers) -> None:
    p = subparsers.add_parser("serve", help="HTTP completion server for editors (TGI, OpenAI and Ollama APIs)")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8080, help="default 8080")
    p.add_argument("--api-key", default=os.environ.get("STABLECODE_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $STABLECODE_API_KEY, else no key)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together, i.e. KV-cache rows (default 8)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait for a row; beyond that, 429 (default 32)")
    p.add_argument("--prefix-cache-mb", type=float, default=None,
                   help="memory for cached prompt prefixes beyond the KV-cache rows, reused by later requests "
                        "(default 1024; 0 turns prefix reuse off)")
    p.add_argument("--speculative", type=int, default=None,
                   help="prompt-lookup tokens verified per step for greedy requests (default: 8 where a drafted pass "
                        "is measured to cost little more than a plain one, else none; 0 turns it off)")
    add_kv_cache_option(p)
    index = p.add_mutually_exclusive_group()
    index.add_argument("--index", type=Path, default=None,
                       help="attribution index: adds POST /overlap (llm-vscode's code attribution) and the completion "
                            "routes' `attribution` option (default: the embedded model's own index when serving it)")
    index.add_argument("--no-index", action="store_true", help="serve without an attribution index")
    p.add_argument("--index-mmap", action="store_true",
                   help="map the attribution index's files instead of reading them into memory (for an index larger "
                        "than RAM; then never rewrite its files in place while serving)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; '*' for any). By default only "
                        "IP addresses, localhost and the --host name are: a guard against DNS rebinding")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help=f"open connections at most; more get 503 at once (default {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                   help="seconds a request's head, and then its body, may take to arrive; slower ones get 408 "
                        f"(default {DEFAULT_READ_TIMEOUT:g})")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="on SIGTERM/SIGINT, seconds running completions may take to finish before they are ended "
                        "with a final error event (default 5)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default info")
    p.set_defaults(func=run_serve)


def run_serve(args) -> None:
    from stablecode.errors import StablecodeError
    from stablecode.server import http

    if not 1 <= args.port <= 65535:
        raise StablecodeError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1 or args.max_queue < 0:
        raise StablecodeError("--max-batch must be >= 1 and --max-queue >= 0")
    if not (args.read_timeout > 0 and args.shutdown_timeout >= 0):
        raise StablecodeError("--read-timeout must be > 0 and --shutdown-timeout >= 0 seconds")
    protocol_options = {"head_timeout": args.read_timeout, "max_connections": args.max_connections,
                        "drain_seconds": args.shutdown_timeout, "log_level": args.log_level}
    http.protocol(args.read_timeout, args.max_connections)  # checks the values
    http.ensure_file_limit(args.max_connections)
    # Bound before anything loads: a port in use is one line and exit 2.
    sock = http.bind(args.host, args.port)
    try:
        _serve(args, sock, protocol_options)
    finally:
        sock.close()


def _serve(args, sock, protocol_options: dict) -> None:
    from stablecode.server import http
    from stablecode.server.app import create_app

    apply_threads(args)
    attributor = serving_attributor(args.model, args.index, args.no_index, args.index_mmap)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    allowed_hosts = [*args.allow_host] + ([] if args.host in WILDCARD_HOSTS else [args.host])
    app = create_app(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, api_key=args.api_key,
                     max_batch=args.max_batch, max_queue=args.max_queue, attributor=attributor,
                     allowed_hosts=allowed_hosts, body_timeout=args.read_timeout, **engine_options(args))
    http.serve(app, sock, **protocol_options)


def engine_options(args) -> dict:
    from stablecode.errors import StablecodeError

    options = {"kv_cache_dtype": args.kv_cache}
    if args.prefix_cache_mb is not None:
        if args.prefix_cache_mb < 0:
            raise StablecodeError(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb}")
        options["prefix_cache_mb"] = args.prefix_cache_mb
    if args.speculative is not None:
        if args.speculative < 0:
            raise StablecodeError(f"--speculative must be >= 0, got {args.speculative}")
        options["speculative"] = args.speculative
    return options


def serving_attributor(model, index, no_index: bool = False, mmap: bool = False):
    """The attribution index to serve: `index` if given; else, when serving the embedded default model,
    its own index if installed (if not, one line on stderr says so); else None. Read into memory
    unless `mmap`."""
    from stablecode import registry
    from stablecode.attribution import Attributor, AttributionIndexError
    from stablecode.attribution.lookup import resolve_index_dir

    if no_index:
        return None
    if index is not None:
        return Attributor(index, in_memory=not mmap)
    embedded = registry.EMBEDDED_MODELS_DIR / registry.DEFAULT_MODEL
    if registry.resolve_model_dir(model).resolve() != embedded.resolve():
        return None
    try:
        directory = resolve_index_dir(None)
    except AttributionIndexError as e:  # not installed; a damaged one is an error (raised by Attributor)
        print(f"stablecode serve: serving without attribution (no POST /overlap): {e}", file=sys.stderr)
        return None
    return Attributor(directory, in_memory=not mmap)
