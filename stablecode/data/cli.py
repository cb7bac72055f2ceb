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
    f.add_argument("--packages", type=Path, default=None,
                   help="JSON: top-level directory -> package, version, licence (written by `data pypi`)")
    f.set_defaults(func=run_from_dir)

    y = sub.add_parser("pypi", help="PyPI wheels of listed packages -> licence-checked, deduplicated .py tree")
    y.add_argument("--train-packages", required=True, type=Path, help="package list (name==version per line)")
    y.add_argument("--heldout-packages", required=True, type=Path,
                   help="package list of the evaluation set: never trained on; training copies of it are removed")
    y.add_argument("--wheels", required=True, type=Path, help="download folder (train/ and heldout/ inside)")
    y.add_argument("--out", required=True, type=Path, help="tree to write (replaced)")
    y.add_argument("--stdlib", type=Path, default=None, help="also take this Python standard library (PSF-2.0)")
    y.add_argument("--stdlib-version", default=None, help="its version, recorded in the manifest")
    y.add_argument("--threshold", type=float, default=0.85, help="near-duplicate Jaccard threshold (default 0.85)")
    y.add_argument("--no-download", action="store_true", help="use the wheels already in --wheels")
    y.set_defaults(func=run_pypi)

    k = sub.add_parser("pack", help="tokenize and pack into memory-mapped shards of fixed-length sequences")
    k.add_argument("--data", required=True, type=Path, help="starcoderdata-layout folder")
    k.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.json (or a folder holding one)")
    k.add_argument("--seq-len", required=True, type=int, help="tokens per training sequence (the context length)")
    k.add_argument("--out", required=True, type=Path, help="pack folder; an interrupted run resumes there")
    k.add_argument("--validation-fraction", type=float, default=0.02,
                   help="fraction of FILES held out for validation (default 0.02)")
    k.add_argument("--workers", type=int, default=2, help="tokenizer processes (default 2)")
    k.add_argument("--fim-rate", type=float, default=0.0,
                   help="fraction of training files rearranged for fill-in-the-middle (StarCoder: 0.5; default 0)")
    k.add_argument("--fim-spm-rate", type=float, default=0.5,
                   help="fraction of those in suffix-prefix-middle order (default 0.5)")
    k.add_argument("--fim-seed", type=int, default=0, help="seed of the FIM draws (default 0)")
    k.add_argument("--fim-piece-chars", type=int, default=None,
                   help="FIM rearranges pieces of a file of at most this many characters, cut at line ends, so a "
                        "piece fits one training window (default 2 × --seq-len)")
    _languages_option(k, "StableCode's stage-1 languages, weight 1")
    k.set_defaults(func=run_pack)


def run_from_dir(args) -> None:
    from stablecode.data.sources import SourceFilters, from_dir

    filters = SourceFilters(max_file_bytes=args.max_file_bytes, max_line_length=args.max_line_length)
    packages = None
    if args.packages:
        import json

        from stablecode.data import DataError

        try:
            packages = json.loads(args.packages.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{args.packages}: cannot read the package table ({e})") from None
    result = from_dir(args.src, args.out, languages=args.languages, license=args.license, repo_name=args.repo_name,
                      exclude=args.exclude, filters=filters, overwrite=args.overwrite, packages=packages, log=_log)
    print(f"wrote {result.files} files ({result.bytes:,} bytes) to {result.out}; "
          f"manifest: {result.out / 'manifest.json'}")


def run_pypi(args) -> None:
    from stablecode.data import DataError
    from stablecode.data.pypi import build_tree, download, read_package_list, requirement_name

    train, heldout = read_package_list(args.train_packages), read_package_list(args.heldout_packages)
    overlap = {requirement_name(r) for r in train} & {requirement_name(r) for r in heldout}
    if overlap:
        raise DataError(f"packages both trained on and held out: {sorted(overlap)}")
    if not args.no_download:
        failed = download(train, args.wheels / "train", log=_log) | download(heldout, args.wheels / "heldout", log=_log)
        if failed:
            _log(f"{len(failed)} package(s) could not be downloaded and are left out: {', '.join(sorted(failed))}")
    build_tree(args.wheels / "train", args.wheels / "heldout", args.out, stdlib=args.stdlib,
               stdlib_version=args.stdlib_version, threshold=args.threshold, log=_log)
    print(f"wrote {args.out}; decisions: {args.out / 'decisions.json'}")


def run_pack(args) -> None:
    from stablecode.data.packing import FimSettings, pack
    from stablecode.data.starcoder import DataMix

    pack(args.data, args.tokenizer, args.seq_len, args.out, validation_fraction=args.validation_fraction,
         workers=args.workers, mix=DataMix.parse(args.languages),
         fim=FimSettings(args.fim_rate, args.fim_spm_rate, args.fim_seed, args.fim_piece_chars or 2 * args.seq_len),
         progress=sys.stderr.isatty(), log=_log)
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
