"""`stablecode data from-dir|pack` and `stablecode tokenizer train`: thin shells over stablecode.data."""

from __future__ import annotations

import sys
from pathlib import Path


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _languages_option(parser, help_default: str) -> None:
    parser.add_argument("--languages", nargs="+", default=None, metavar="LANG[=WEIGHT]",
                        help=f"starcoderdata language folders, optionally with a weight (times each file is used, "
                             f"e.g. python=1 markdown=0.5); default: {help_default}")


def add_data_command(subparsers) -> None:
    p = subparsers.add_parser("data", help="build, read and pack training data (starcoderdata layout)")
    sub = p.add_subparsers(dest="data_command", required=True)

    f = sub.add_parser("from-dir", help="a local tree of source files -> starcoderdata-layout parquet folders")
    f.add_argument("src", type=Path, help="source tree")
    f.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder of parquet per language)")
    f.add_argument("--languages", nargs="+", default=None, metavar="LANG",
                   help="languages to take (default: StableCode's stage-1 list; 'all' for every known one)")
    f.add_argument("--license", default=None,
                   help="licence of the tree, e.g. PSF-2.0 (default: identified from its LICENSE/COPYING file)")
    f.add_argument("--repo-name", default=None, help="value of max_stars_repo_name (default: the folder's name)")
    f.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files and folders whose name or relative path matches (repeatable)")
    f.add_argument("--max-file-bytes", type=int, default=1_000_000, help="skip larger files (default 1 MB)")
    f.add_argument("--max-line-length", type=int, default=1000, help="skip files with a longer line (minified)")
    f.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    f.set_defaults(func=run_from_dir)

    k = sub.add_parser("pack", help="tokenize and pack into memory-mapped shards of fixed-length sequences")
    k.add_argument("--data", required=True, type=Path, help="starcoderdata-layout folder")
    k.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.json (or a folder holding one)")
    k.add_argument("--seq-len", required=True, type=int, help="tokens per training sequence (the context length)")
    k.add_argument("--out", required=True, type=Path, help="pack folder; an interrupted run resumes there")
    k.add_argument("--validation-fraction", type=float, default=0.02,
                   help="fraction of FILES held out for validation (default 0.02)")
    k.add_argument("--workers", type=int, default=2, help="tokenizer processes (default 2)")
    _languages_option(k, "StableCode's stage-1 languages, weight 1")
    k.set_defaults(func=run_pack)


def run_from_dir(args) -> None:
    from stablecode.data.sources import SourceFilters, from_dir

    filters = SourceFilters(max_file_bytes=args.max_file_bytes, max_line_length=args.max_line_length)
    result = from_dir(args.src, args.out, languages=args.languages, license=args.license, repo_name=args.repo_name,
                      exclude=args.exclude, filters=filters, overwrite=args.overwrite, log=_log)
    print(f"wrote {result.files} files ({result.bytes:,} bytes) to {result.out}; "
          f"manifest: {result.out / 'manifest.json'}")


def run_pack(args) -> None:
    from stablecode.data.packing import pack
    from stablecode.data.starcoder import DataMix

    pack(args.data, args.tokenizer, args.seq_len, args.out, validation_fraction=args.validation_fraction,
         workers=args.workers, mix=DataMix.parse(args.languages), progress=sys.stderr.isatty(), log=_log)
    print(f"wrote {args.out / 'index.json'}")


def add_tokenizer_command(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="StarCoder-style byte-level BPE trained on the training split of a corpus")
    t.add_argument("--data", required=True, type=Path, help="starcoderdata-layout folder")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, type=Path, help="tokenizer.json to write")
    t.add_argument("--validation-fraction", type=float, default=0.02,
                   help="files held out (never read); use the same value as `data pack` (default 0.02)")
    t.add_argument("--max-bytes", type=int, default=None, help="read at most this much text")
    _languages_option(t, "StableCode's stage-1 languages, weight 1")
    t.set_defaults(func=run_tokenizer_train)


def run_tokenizer_train(args) -> None:
    from stablecode.data.starcoder import DataMix
    from stablecode.data.tokenizer_train import train_tokenizer

    train_tokenizer(args.data, args.out, vocab_size=args.vocab_size, validation_fraction=args.validation_fraction,
                    mix=DataMix.parse(args.languages), max_bytes=args.max_bytes, progress=sys.stderr.isatty(),
                    log=_log)
