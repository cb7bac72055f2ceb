"""A corpus from PyPI wheels: download, licence check, `.py` extraction, exact and near deduplication.

`stablecode data pypi` turns a committed list of package names (pinned `name==version` lines) into
a source tree ready for `stablecode data from-dir TREE/train --packages TREE/packages-train.json`:

    TREE/train/<name>-<version>/<path inside the wheel>.py
    TREE/heldout/<name>-<version>/...
    TREE/packages-train.json, packages-heldout.json   directory -> package, version, licence
    TREE/decisions.json   every package kept or dropped and why; every file dropped as a duplicate

The licence of a package comes from its metadata: License-Expression (PEP 639) first, then the
trove classifiers, then the License field, then the licence files inside the wheel. Packages whose
licence is not permissive (or cannot be identified) are dropped, with the reason recorded.

Duplicates: exact (same sha256) and near (MinHash over word 5-grams, Jaccard >= threshold, found
with LSH). Held-out packages are indexed first, so a training file that copies a held-out file
(vendored code, as pip and setuptools do) is removed from training; within training the first file
in list order is kept. A file whose SPDX header names a licence that is not permissive is dropped
too. The standard library, when given, comes right after the held-out set.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from stablecode.atomic import atomic_write_text
from stablecode.data import DataError
from stablecode.data.sources import UNKNOWN_LICENSE, SourceFilters, identify_license, spdx_license

# SPDX identifiers (upper-cased) that allow training and redistribution of derived weights with attribution.
PERMISSIVE = frozenset(s.upper() for s in (
    "MIT", "MIT-0", "MIT-CMU", "BSD-2-Clause", "BSD-3-Clause", "BSD-3-Clause-Clear", "BSD-4-Clause", "0BSD",
    "Apache-2.0", "Apache-1.1", "PSF-2.0", "Python-2.0", "ISC", "Unlicense", "CC0-1.0", "Zlib", "HPND", "BSL-1.0",
    "NCSA", "X11", "Expat", "WTFPL", "TCL", "ZPL-2.0", "ZPL-2.1", "AFL-2.1", "AFL-3.0", "UPL-1.0", "BlueOak-1.0.0", "Unicode-DFS-2016", "Unicode-3.0",
))
# Trove classifiers -> SPDX.
CLASSIFIERS = {
    "MIT License": "MIT", "MIT No Attribution License (MIT-0)": "MIT-0", "BSD License": "BSD-3-Clause",
    "Apache Software License": "Apache-2.0", "Python Software Foundation License": "PSF-2.0",
    "ISC License (ISCL)": "ISC", "The Unlicense (Unlicense)": "Unlicense", "zlib/libpng License": "Zlib",
    "Historical Permission Notice and Disclaimer (HPND)": "HPND", "Boost Software License 1.0 (BSL-1.0)": "BSL-1.0",
    "Universal Permissive License (UPL)": "UPL-1.0", "University of Illinois/NCSA Open Source License": "NCSA",
    "CC0 1.0 Universal (CC0 1.0) Public Domain Dedication": "CC0-1.0",
    "GNU General Public License (GPL)": "GPL", "GNU General Public License v2 (GPLv2)": "GPL-2.0",
    "GNU General Public License v2 or later (GPLv2+)": "GPL-2.0-or-later",
    "GNU General Public License v3 (GPLv3)": "GPL-3.0", "GNU General Public License v3 or later (GPLv3+)": "GPL-3.0-or-later",
    "GNU Lesser General Public License v2 (LGPLv2)": "LGPL-2.0", "GNU Library or Lesser General Public License (LGPL)": "LGPL",
    "GNU Lesser General Public License v2 or later (LGPLv2+)": "LGPL-2.0-or-later",
    "GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0",
    "GNU Lesser General Public License v3 or later (LGPLv3+)": "LGPL-3.0-or-later",
    "GNU Affero General Public License v3": "AGPL-3.0",
    "GNU Affero General Public License v3 or later (AGPLv3+)": "AGPL-3.0-or-later",
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0", "Mozilla Public License 1.1 (MPL 1.1)": "MPL-1.1",
    "Eclipse Public License 2.0 (EPL-2.0)": "EPL-2.0", "Zope Public License": "ZPL-2.1",
}
# Free-text License fields as packages write them -> SPDX.
LICENSE_WORDS = [
    (re.compile(r"^\s*(the )?mit( license)?\s*$", re.I), "MIT"),
    (re.compile(r"^\s*(new |modified |revised )?bsd([- ]?3([- ]clause)?)?( license)?\s*$", re.I), "BSD-3-Clause"),
    (re.compile(r"^\s*bsd[- ]?2([- ]clause)?( license)?\s*$", re.I), "BSD-2-Clause"),
    (re.compile(r"^\s*(the )?apache( software)?( license)?[ ,-]*(v(ersion)?\s*)?2(\.0)?( license)?\s*$", re.I), "Apache-2.0"),
    (re.compile(r"^\s*apache( software license)?\s*$", re.I), "Apache-2.0"),
    (re.compile(r"^\s*(psf|python software foundation)( license)?( v?2(\.0)?)?\s*$", re.I), "PSF-2.0"),
    (re.compile(r"^\s*isc( license)?\s*$", re.I), "ISC"),
]
SPDX_TOKEN = re.compile(r"[A-Za-z0-9.+-]+")
SHINGLE = 5


def read_package_list(path: str | Path) -> list[str]:
    """Requirement lines of a package list (comments and blank lines dropped), in order."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read package list ({e})") from None
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def requirement_name(requirement: str) -> str:
    """Normalised project name of `name==version` (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>!~ \[;]", requirement, 1)[0]).lower()


def download(requirements: list[str], dest: str | Path, jobs: int = 6, log=None) -> dict[str, str]:
    """`pip download --no-deps --only-binary :all:` of each requirement into `dest`; returns failures.

    Wheels only: pip would build an sdist's metadata (running its build backend) just to download it.
    A wheel already in `dest` for a requirement's name is not downloaded again.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    have = {wheel_name(w) for w in dest.glob("*.whl")}

    def fetch(requirement: str) -> tuple[str, str | None]:
        if requirement_name(requirement) in have:
            return requirement, None
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "--quiet", "--dest", str(dest), requirement], capture_output=True, text=True)
        if done.returncode:
            lines = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()
            return requirement, (lines[-1] if lines else f"pip exited with {done.returncode}")
        return requirement, None

    failures = {}
    with ThreadPoolExecutor(jobs) as pool:
        for requirement, error in pool.map(fetch, requirements):
            if error:
                failures[requirement] = error
                if log:
                    log(f"{requirement}: download failed: {error}")
    return failures


def wheel_name(path: Path) -> str:
    return requirement_name(path.name.split("-", 1)[0])


# ---- licences --------------------------------------------------------------------------------

def spdx_expression_license(expression: str) -> tuple[str | None, str]:
    """(licence to record, or None to drop; why) for an SPDX expression such as `MPL-2.0 AND (MIT OR X)`.

    OR needs one permissive side, AND needs both; `X WITH exception` counts as X.
    """
    text = expression.strip()
    tokens = re.findall(r"\(|\)|[A-Za-z0-9.+:-]+", text)
    python, previous_with = [], False
    for token in tokens:
        if previous_with:  # the exception name after WITH
            previous_with = False
            continue
        upper = token.upper()
        if upper == "WITH":
            previous_with = True
        elif upper in ("AND", "OR"):
            python.append(upper.lower())
        elif token in "()":
            python.append(token)
        else:
            python.append(str(upper.removesuffix("-ONLY").removesuffix("+") in PERMISSIVE))
    try:
        permissive = bool(eval(" ".join(python) or "False", {"__builtins__": {}}))  # only True/False/and/or/()
    except SyntaxError:
        return None, f"License-Expression {text!r} is not a valid SPDX expression"
    if permissive:
        return text, f"License-Expression {text!r}"
    return None, f"License-Expression {text!r} is not permissive"


def classify_license(metadata, license_texts: dict[str, str]) -> tuple[str | None, str, dict]:
    """(SPDX licence or None, reason, evidence) from a wheel's METADATA and its licence files."""
    evidence = {}
    expression = metadata.get("License-Expression")
    classifiers = [c.split("::")[-1].strip() for c in metadata.get_all("Classifier") or []
                   if c.startswith("License ::")]
    field_text = (metadata.get("License") or "").strip()
    files = {name: identify_license(text) for name, text in license_texts.items()}
    evidence = {"license_expression": expression, "classifiers": classifiers, "license_field": field_text[:200],
                "license_files": files}
    if expression:
        licence, why = spdx_expression_license(expression)
        return licence, why, evidence
    spdx = [CLASSIFIERS.get(c, c) for c in classifiers if c != "OSI Approved"]
    if spdx:
        permissive = [s for s in spdx if s.upper() in PERMISSIVE]
        if permissive:  # several classifiers are alternatives (dual licensing)
            return permissive[0], f"classifier {permissive[0]}", evidence
        return None, f"classifiers {spdx} are not permissive", evidence
    if field_text:
        first_line = field_text.splitlines()[0]
        for pattern, name in LICENSE_WORDS:
            if pattern.match(first_line):
                return name, f"License field {first_line!r}", evidence
        if "\n" in field_text or len(field_text) > 100:  # the whole licence text pasted into the field
            found = identify_license(field_text)
            if found != UNKNOWN_LICENSE:
                return (found if found.upper() in PERMISSIVE else None), f"License field text reads as {found}", evidence
        licence, why = spdx_expression_license(first_line)
        if licence:
            return licence, f"License field {first_line!r}", evidence
    identified = sorted({v for v in files.values() if v != UNKNOWN_LICENSE})
    if identified:
        if all(v.upper() in PERMISSIVE for v in identified):
            return identified[0], f"licence file reads as {identified[0]}", evidence
        return None, f"licence files read as {identified}", evidence
    return None, "no licence in metadata or licence files", evidence


@dataclass
class Distribution:
    name: str
    version: str
    wheel: str
    license: str | None
    reason: str
    evidence: dict = field(default_factory=dict)

    @property
    def directory(self) -> str:
        return f"{self.name}-{self.version}"


def inspect_wheel(path: Path) -> tuple[Distribution, zipfile.ZipFile]:
    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    meta_name = next((n for n in names if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
    if meta_name is None:
        raise DataError(f"{path}: no .dist-info/METADATA: not a wheel")
    metadata = email.parser.Parser().parsestr(archive.read(meta_name).decode("utf-8", "replace"))
    info_dir = meta_name.rsplit("/", 1)[0]
    texts = {}
    for n in names:
        base = n.rsplit("/", 1)[-1]
        if n.startswith(info_dir + "/") and re.match(r"(licen[cs]e|copying|notice)", base, re.I):
            texts[n.split("/", 1)[1]] = archive.read(n).decode("utf-8", "replace")
    licence, reason, evidence = classify_license(metadata, texts)
    name = requirement_name(metadata.get("Name") or wheel_name(path))
    return Distribution(name, metadata.get("Version") or "0", path.name, licence, reason, evidence), archive


# ---- near duplicates ---------------------------------------------------------------------------

WORD = re.compile(rb"\w+")


def shingle_hashes(data: bytes) -> np.ndarray:
    """32-bit hashes of the word 5-grams of a file (its set, as MinHash needs)."""
    words = WORD.findall(data)
    if len(words) < SHINGLE:
        words = words + [b""] * (SHINGLE - len(words))
    hashed = np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=len(words))
    # A polynomial over the window's word hashes, reduced to 32 bits: cheap and order-sensitive.
    combined = np.zeros(len(words) - SHINGLE + 1, dtype=np.uint64)
    for k in range(SHINGLE):
        combined = combined * np.uint64(1_000_003) + hashed[k:len(words) - SHINGLE + 1 + k]
    return np.unique(combined & np.uint64(0xFFFFFFFF))


class NearDuplicateIndex:
    """MinHash LSH over files: `add_if_new` keeps the first of any group with Jaccard >= threshold."""

    def __init__(self, threshold: float = 0.85, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self.num_perm, self.seed = num_perm, seed
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._template = MinHash(num_perm=num_perm, seed=seed, scheme="affine32")

    def signature(self, data: bytes):
        m = self._minhash(num_perm=self.num_perm, seed=self.seed, permutations=self._template.permutations, scheme="affine32",
                          hashfunc=int)
        hashes = shingle_hashes(data)
        for start in range(0, len(hashes), 50_000):  # bounded memory for the largest files
            m.update_batch(hashes[start:start + 50_000].tolist())
        return m

    def add_if_new(self, key: str, data: bytes) -> str | None:
        """None when new (and now indexed), else the key of an indexed near-duplicate."""
        signature = self.signature(data)
        found = self.lsh.query(signature)
        if found:
            return min(found)
        self.lsh.insert(key, signature)
        return None


# ---- building the tree -----------------------------------------------------------------------

@dataclass
class BuildResult:
    tree: Path
    kept: list[Distribution]
    dropped: list[Distribution]
    files: dict[str, int]
    bytes: dict[str, int]
    duplicates: dict[str, int]


def _python_members(archive: zipfile.ZipFile, max_file_bytes: int):
    for info in archive.infolist():
        name = info.filename
        if name.endswith(".py") and not info.is_dir() and ".dist-info/" not in name and info.file_size <= max_file_bytes:
            yield name, info


def build_tree(train_wheels: str | Path, heldout_wheels: str | Path, out: str | Path,
               stdlib: str | Path | None = None, stdlib_version: str | None = None, threshold: float = 0.85,
               max_file_bytes: int = 1_000_000, log=None) -> BuildResult:
    """Write the deduplicated tree (see the module docstring) to `out`, replacing it."""
    train_wheels, heldout_wheels, out = Path(train_wheels), Path(heldout_wheels), Path(out)
    started = time.monotonic()
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    index = NearDuplicateIndex(threshold)
    exact: dict[str, str] = {}
    packages, kept, dropped = {"train": {}, "heldout": {}}, [], []
    duplicate_files = []
    counts = {"heldout": 0, "train": 0}
    sizes = {"heldout": 0, "train": 0}
    duplicates = {"exact": 0, "near": 0, "non-permissive-header": 0}

    def take(split: str, directory: str, relative: str, data: bytes) -> None:
        key = f"{split}/{directory}/{relative}"
        header = spdx_license(data[:4096].decode("utf-8", "replace"), SourceFilters())
        if header and spdx_expression_license(header)[0] is None:  # e.g. a GPL file vendored into an MIT package
            duplicates["non-permissive-header"] += 1
            duplicate_files.append({"file": key, "kind": "non-permissive-header", "of": header})
            return
        digest = hashlib.sha256(data).hexdigest()
        if digest in exact:
            duplicates["exact"] += 1
            duplicate_files.append({"file": key, "kind": "exact", "of": exact[digest]})
            return
        exact[digest] = key
        near = index.add_if_new(key, data)
        if near is not None:
            duplicates["near"] += 1
            duplicate_files.append({"file": key, "kind": "near", "of": near})
            return
        target = staging / split / directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        counts[split] += 1
        sizes[split] += len(data)

    def wheels(split: str, folder: Path) -> None:
        seen_names = set()
        for path in sorted(folder.glob("*.whl")):
            try:
                dist, archive = inspect_wheel(path)
            except (zipfile.BadZipFile, DataError) as e:
                dropped.append(Distribution(wheel_name(path), "?", path.name, None, f"unreadable wheel: {e}"))
                continue
            if dist.name in seen_names:
                dropped.append(dataclasses_replace(dist, reason="another wheel of the same package came first"))
                continue
            seen_names.add(dist.name)
            if dist.license is None:
                dropped.append(dist)
                if log:
                    log(f"dropped {dist.name} {dist.version}: {dist.reason}")
                continue
            kept.append(dist)
            packages[split][dist.directory] = {"package": dist.name, "version": dist.version,
                                               "license": dist.license}
            with archive:
                for name, info in _python_members(archive, max_file_bytes):
                    take(split, dist.directory, name, archive.read(info))
            if log:
                log(f"{split}: {dist.name} {dist.version} ({dist.license}): {counts[split]:,} files so far")

    wheels("heldout", heldout_wheels)
    if stdlib is not None:
        stdlib = Path(stdlib)
        directory = f"cpython-stdlib-{stdlib_version or 'unknown'}"
        packages["train"][directory] = {"package": "cpython-stdlib", "version": stdlib_version or "unknown",
                                        "license": "PSF-2.0"}
        for path in sorted(stdlib.rglob("*.py")):
            relative = path.relative_to(stdlib)
            if relative.parts[0] == "site-packages" or "__pycache__" in relative.parts:
                continue  # third-party code under other licences; bytecode caches
            if path.is_file() and path.stat().st_size <= max_file_bytes:
                take("train", directory, relative.as_posix(), path.read_bytes())
        kept.append(Distribution("cpython-stdlib", stdlib_version or "unknown", str(stdlib), "PSF-2.0",
                                 "CPython's LICENSE (PSF-2.0)"))
    wheels("train", train_wheels)
    staging.mkdir(parents=True, exist_ok=True)
    for split, table in packages.items():
        atomic_write_text(staging / f"packages-{split}.json", json.dumps(table, indent=1, sort_keys=True) + "\n")
    decisions = {"kept": [asdict(d) for d in kept], "dropped": [asdict(d) for d in dropped],
                 "duplicates": duplicates, "duplicate_files": duplicate_files, "threshold": threshold,
                 "files": counts, "bytes": sizes, "seconds": round(time.monotonic() - started, 1)}
    atomic_write_text(staging / "decisions.json", json.dumps(decisions, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    if log:
        log(f"kept {len(kept)} packages, dropped {len(dropped)}; train {counts['train']:,} files "
            f"({sizes['train']:,} bytes), held out {counts['heldout']:,} files ({sizes['heldout']:,} bytes); "
            f"removed {duplicates['exact']:,} exact and {duplicates['near']:,} near duplicates "
            f"in {time.monotonic() - started:.0f}s")
    return BuildResult(out, kept, dropped, counts, sizes, duplicates)


def dataclasses_replace(dist: Distribution, **changes) -> Distribution:
    return Distribution(**(asdict(dist) | changes))
