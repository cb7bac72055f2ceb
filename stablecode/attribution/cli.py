"""`stablecode index build|info` and `stablecode attribute`: thin shells over build_index and Attributor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stablecode.errors import StablecodeError


def add_index_command(subparsers) -> None:
    p = subparsers.add_parser("index", help="build or describe an attribution index of a training corpus")
    commands = p.add_subparsers(dest="index_command", required=True)
    b = commands.add_parser("build", help="index a corpus in the starcoderdata layout (DIR/<language>/*.parquet)")
    b.add_argument("--data", required=True, type=Path, help="corpus directory (or one parquet file)")
    b.add_argument("--out", required=True, type=Path, help="index directory to write (replaced atomically)")
    b.add_argument("--window", type=int, default=50, help="window length in normalised characters (default 50)")
    b.add_argument("--stride", type=int, default=32,
                   help="fingerprint every STRIDE-th window (default 32); shared stretches of at least "
                        "window + stride - 1 normalised characters are always found")
    b.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    b.add_argument("--license", default=None, help="licence to record for files whose rows carry none")
    b.add_argument("--exclude", type=Path, default=None,
                   help="file of keys to leave out, one per line (`id`, else `repo/path`; an optional "
                        "`language<TAB>` prefix is ignored), e.g. the data pipeline's validation_files.tsv")
    b.set_defaults(func=run_index_build)
    i = commands.add_parser("info", help="describe an index")
    i.add_argument("index", nargs="?", default=None, help="index directory (default: the embedded model's)")
    i.set_defaults(func=run_index_info)


def run_index_build(args) -> None:
    from stablecode.attribution.build import build_index, read_exclude_list

    exclude = read_exclude_list(args.exclude) if args.exclude else None
    build_index(args.data, args.out, window=args.window, stride=args.stride, workers=args.workers,
                default_license=args.license, exclude=exclude, progress=sys.stderr.isatty(),
                log=lambda line: print(line, file=sys.stderr))
    print(describe_index(args.out))


def describe_index(index) -> str:
    from stablecode.attribution.build import index_size
    from stablecode.attribution.lookup import resolve_index_dir
    from stablecode.attribution.storage import read_manifest

    directory = resolve_index_dir(index)
    manifest = read_manifest(directory)
    counts, build = manifest["counts"], manifest["build"]
    size = index_size(directory)
    mb = 1e6
    lines = [
        f"index                    {directory}",
        f"sources                  {counts['sources']:,} files, {counts['source_bytes'] / mb:,.1f} MB "
        f"({', '.join(f'{k} {v:,}' for k, v in manifest['languages'].items())})",
        f"window                   {manifest['window']} normalised characters, "
        f"one in every {manifest['stride']} fingerprinted",
        f"always found             shared stretches of {manifest['guaranteed_match_chars']}+ normalised characters",
        f"fingerprints             {counts['fingerprints']:,}",
        f"Bloom filter             {manifest['bloom']['bits'] / 8 / mb:,.2f} MB, {manifest['bloom']['hashes']} hashes",
        f"size                     {size / mb:,.1f} MB "
        f"({size / max(counts['source_bytes'], 1):.3f} bytes per corpus byte)",
        f"built in                 {build['seconds']:,.1f} s with {build['workers']} workers from {build['data']}",
    ]
    return "\n".join(lines)


def run_index_info(args) -> None:
    print(describe_index(args.index))


def add_attribute_command(subparsers) -> None:
    p = subparsers.add_parser("attribute", help="find which parts of code come from the training data, and from where")
    p.add_argument("file", nargs="?", type=Path, default=None, help="file to check (default: stdin)")
    p.add_argument("--index", default=None,
                   help="attribution index, or a model directory holding one (default: the embedded model's)")
    p.add_argument("--min-length", type=int, default=None,
                   help="shortest match reported, in normalised characters (default: the index's window)")
    p.add_argument("--max-sources", type=int, default=5, help="sources listed per span (default 5)")
    p.add_argument("--json", action="store_true", help="print {\"spans\": ..., \"sources\": ...} as JSON")
    p.set_defaults(func=run_attribute)


def _lines(text: str, start: int, end: int) -> tuple[int, int]:
    return text.count("\n", 0, start) + 1, text.count("\n", 0, max(start, end - 1)) + 1


def format_spans(name: str, text: str, spans, attributor) -> str:
    """A readable report: each span with a short excerpt and where it comes from."""
    covered = sum(s.end - s.start for s in spans)
    out = [f"{name}: {len(spans)} span{'s' * (len(spans) != 1)} found in the training data, "
           f"{covered:,} of {len(text):,} characters ({attributor.num_sources:,} indexed files)"]
    for number, span in enumerate(spans, 1):
        first, last = _lines(text, span.start, span.end)
        out.append("")
        out.append(f"[{number}] characters {span.start}-{span.end}, lines {first}-{last}")
        excerpt = span.text.splitlines()
        for line in excerpt[:4]:
            out.append(f"    | {line[:100]}")
        if len(excerpt) > 4:
            out.append(f"    | ... ({len(excerpt) - 4} more lines)")
        for m in span.matches:
            part = "" if (m.start, m.end) == (span.start, span.end) else f" (characters {m.start}-{m.end})"
            out.append(f"    from {m.source}, lines {m.source_lines[0]}-{m.source_lines[1]}{part}")
    return "\n".join(out)


def run_attribute(args) -> None:
    from stablecode.attribution.lookup import Attributor, attribution_json

    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise StablecodeError(f"{args.file}: cannot read ({e})") from None
        name = str(args.file)
    elif not sys.stdin.isatty():
        text, name = sys.stdin.read(), "<stdin>"
    else:
        raise StablecodeError("nothing to check: give a FILE or pipe text on stdin")
    attributor = Attributor(args.index)
    spans = attributor.find(text, min_length=args.min_length, max_sources=args.max_sources)
    if args.json:
        print(json.dumps(attribution_json(text, spans), indent=1))
    else:
        print(format_spans(name, text, spans, attributor))
