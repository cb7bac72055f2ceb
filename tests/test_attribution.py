"""Attribution index: building, exact lookup, integrity checks and the CLI (POST /overlap: tests/server)."""

import json
import random
import shutil
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stablecode.attribution import Attributor, AttributionIndexError, build_index
from stablecode.attribution import lookup
from stablecode.attribution.fingerprint import normalise
from stablecode.cli import main
from stablecode.errors import StablecodeError

WINDOW, STRIDE = 50, 32


def word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(4, 9)))


def synthetic_file(rng: random.Random, functions: int = 8) -> str:
    """Python-like code whose identifiers are random, so no 50-character stretch repeats by chance."""
    lines = [f"# {word(rng)} {word(rng)}: héllo ✓ 日本語", ""]
    for _ in range(functions):
        lines.append(f"def {word(rng)}({', '.join(word(rng) for _ in range(rng.randint(1, 3)))}):")
        for _ in range(rng.randint(2, 6)):
            lines.append(f"    {word(rng)} = {word(rng)}({word(rng)}, {rng.randint(0, 999)})")
        lines.append(f"    if {word(rng)} > {rng.randint(0, 99)}:")
        lines.append(f"        return {word(rng)}.{word(rng)}()")
        lines.append(f"    return {word(rng)}")
        lines.append("")
    return "\n".join(lines)


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A starcoderdata-layout corpus: python/ in two parquet files (starcoderdata's columns only),
    and go/ with the from-dir extra columns (licence, language)."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("corpus")
    texts = [synthetic_file(rng) for _ in range(9)]
    rows = [{"content": t, "max_stars_repo_name": f"owner{i}/repo{i}", "max_stars_repo_path": f"pkg/mod{i}.py",
             "max_stars_count": i, "id": f"id{i}"} for i, t in enumerate(texts)]
    rows.insert(3, {"content": None, "max_stars_repo_name": "x/null", "max_stars_repo_path": "null.py",
                    "max_stars_count": 0, "id": "null"})
    write_parquet(root / "python" / "train-00000-of-00002.parquet", rows[:5])
    write_parquet(root / "python" / "train-00001-of-00002.parquet", rows[5:])
    go_text = synthetic_file(rng).replace("def ", "func ")
    write_parquet(root / "go" / "train-00000-of-00001.parquet",
                  [{"content": go_text, "max_stars_repo_name": "gopher/tool", "max_stars_repo_path": "main.go",
                    "max_stars_count": 3, "id": "go0", "license": "MIT", "language": "go"},
                   {"content": "short", "max_stars_repo_name": "gopher/tool", "max_stars_repo_path": "tiny.go",
                    "max_stars_count": 3, "id": "go1", "license": "MIT", "language": "go"}])
    sources = {f"pkg/mod{i}.py": (f"owner{i}/repo{i}", t) for i, t in enumerate(texts)}
    sources["main.go"] = ("gopher/tool", go_text)
    return root, sources


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(corpus[0], out, window=WINDOW, stride=STRIDE, workers=1, default_license="PSF-2.0")
    return out


@pytest.fixture(scope="module")
def attributor(index):
    return Attributor(index)


def unseen_code(seed: int = 1234) -> str:
    return synthetic_file(random.Random(f"unseen-{seed}"), functions=4)


@pytest.mark.parametrize("text", ["  a\tb\r\n\n  c  ", "x\u3000\u00a0y\x1cz", "é  ✓\n\t😀 ", "", " ", "abc"])
def test_normalise_collapses_whitespace_runs_and_maps_offsets(text):
    codes, starts = normalise(text)
    expected = "".join(" " if c.isspace() else c for i, c in enumerate(text)
                       if not (c.isspace() and i and text[i - 1].isspace()))
    assert "".join(map(chr, codes.tolist())) == expected
    assert [text[i] if not text[i].isspace() else " " for i in starts.tolist()] == list(expected)
    assert all(i == 0 or not (text[i].isspace() and text[i - 1].isspace()) for i in starts.tolist())


def test_manifest_and_sources(attributor, corpus):
    manifest = attributor.index.manifest
    assert manifest["counts"]["sources"] == 11  # 9 python + 2 go; the null row is skipped
    assert manifest["languages"] == {"go": 2, "python": 9}
    assert manifest["guaranteed_match_chars"] == WINDOW + STRIDE - 1
    paths = {attributor.source(i).path: attributor.source(i) for i in range(attributor.num_sources)}
    assert paths["main.go"].license == "MIT" and paths["main.go"].language == "go"
    assert paths["pkg/mod0.py"].license == "PSF-2.0"  # the default for rows without a licence
    assert paths["pkg/mod4.py"].repository == "owner4/repo4" and paths["pkg/mod4.py"].stars == 4
    for source in paths.values():
        if source.path in corpus[1]:
            assert attributor.source_text(source.index) == corpus[1][source.path][1]


def test_bloom_filter_holds_every_stored_fingerprint(attributor):
    from stablecode.attribution.fingerprint import bloom_positions

    index = attributor.index
    assert np.all(index.hashes[1:] >= index.hashes[:-1])  # the table is sorted
    bits = bloom_positions(np.asarray(index.hashes), attributor._bloom_bits, attributor._bloom_hashes)
    assert ((index.bloom[(bits >> np.uint64(3)).astype(np.intp)] >> (bits & np.uint64(7))) & 1).all()
    rng = np.random.default_rng(0)
    others = rng.integers(0, 2 ** 63, size=20000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    bits = bloom_positions(others, attributor._bloom_bits, attributor._bloom_hashes)
    false_positives = ((index.bloom[(bits >> np.uint64(3)).astype(np.intp)] >> (bits & np.uint64(7))) & 1).all(1)
    assert false_positives.mean() < 0.02


def test_source_regions_agree_with_whole_file_normalisation(attributor):
    """Matches are checked on parts of a source normalised from a checkpoint: the same characters
    and offsets as normalising the whole file."""
    rng = random.Random(0)
    for i in range(attributor.num_sources):
        text = attributor.source_text(i)
        codes, starts = normalise(text)
        for _ in range(20):
            begin = rng.randrange(-50, len(codes) + 10)
            end = begin + rng.randrange(1, 1500)
            region_codes, region_starts, first = attributor._source_region(i, text, begin, end)
            assert first <= max(begin, 0) and first + len(region_codes) >= min(end, len(codes))
            assert np.array_equal(region_codes, codes[first:first + len(region_codes)])
            assert np.array_equal(region_starts, starts[first:first + len(region_codes)])


def test_verbatim_excerpt_found_with_exact_span_and_source(attributor, corpus):
    repo, text = corpus[1]["pkg/mod5.py"]
    a = text.index("def ", 300)
    b = text.index("return", a + 200) + len("return")
    prefix, suffix = unseen_code(1)[:120] + "\n", "\n" + unseen_code(2)[:120]
    document = prefix + text[a:b] + suffix
    spans = attributor.find(document)
    assert len(spans) == 1
    span = spans[0]
    assert (span.start, span.end) == (len(prefix), len(prefix) + b - a)
    assert span.text == text[a:b]
    (match,) = span.matches
    assert (match.source.repository, match.source.path) == (repo, "pkg/mod5.py")
    assert (match.source_start, match.source_end) == (a, b)
    assert (match.start, match.end) == (span.start, span.end)
    assert match.source_lines == (text.count("\n", 0, a) + 1, text.count("\n", 0, b) + 1)


def test_whole_file_found_including_non_ascii(attributor, corpus):
    for path, (repo, text) in corpus[1].items():
        spans = attributor.find(text)
        assert [(s.start, s.end) for s in spans] == [(0, len(text.rstrip()))], path
        assert spans[0].matches[0].source.path == path
        assert (spans[0].matches[0].source_start, spans[0].matches[0].source_end) == (0, len(text.rstrip()))


def test_reindented_copy_found_with_exact_span(attributor, corpus):
    repo, text = corpus[1]["pkg/mod2.py"]
    a = text.index("def ")
    b = text.index("def ", a + 400) - 1  # the newline before the next def
    original = text[a:b]
    # 4-space indents become a tab and 2 extra spaces, lines end in CRLF, the block is nested.
    changed = textwrap.indent(original.replace("    ", "\t  ").replace("\n", "\r\n"), "        ")
    document = "class Wrapper:\r\n" + changed + "\r\n"
    spans = attributor.find(document)
    assert len(spans) == 1
    span = spans[0]
    start = document.index("def ")
    end = document.rstrip().__len__()
    assert (span.start, span.end) == (start, end)
    match = span.matches[0]
    assert match.source.path == "pkg/mod2.py"
    assert (match.source_start, match.source_end) == (a, a + len(original.rstrip()))


def test_unseen_code_gives_no_match(attributor):
    for seed in range(20):
        assert attributor.find(unseen_code(seed)) == []


def test_edits_breaking_every_window_give_none(attributor, corpus):
    rng = random.Random(3)
    repo, text = corpus[1]["pkg/mod7.py"]
    codes, starts = normalise(text)

    def edited(spacing: int, jitter: int) -> str:
        """An insertion, deletion or substitution at normalised positions spacing·k + [0, jitter)."""
        pieces, last = [], 0
        for i in range(0, len(codes), spacing):
            at = min(i + rng.randrange(jitter), len(codes) - 1)
            at = int(starts[at - 1 if codes[at] == 32 else at])  # deleting a space from a run changes nothing
            kind = rng.choice(["insert", "delete", "substitute"])
            pieces += [text[last:at], "" if kind == "delete" else rng.choice("@$?!")]
            last = at if kind == "insert" else at + 1
        return "".join(pieces) + text[last:]

    # Edits never more than 49 normalised characters apart leave no 50-character window intact.
    for spacing in (10, 24, 40):
        for _ in range(4):
            assert attributor.find(edited(spacing, WINDOW - spacing)) == []
    # With edits 400 characters apart, the unedited stretches are found (so the test can fail).
    spans = attributor.find(edited(400, 1))
    assert len(spans) >= 3 and all(len(normalise(s.text)[0]) < 400 for s in spans)
    assert all(m.source.path == "pkg/mod7.py" for s in spans for m in s.matches)


def test_every_stretch_of_guaranteed_length_is_found(corpus, tmp_path):
    """Any shared stretch of window + stride - 1 normalised characters is found, wherever it starts."""
    window, stride = 12, 5
    out = tmp_path / "small"
    build_index(corpus[0], out, window=window, stride=stride, workers=1)
    attributor = Attributor(out)
    repo, text = corpus[1]["pkg/mod1.py"]
    codes, starts = normalise(text)
    length = window + stride - 1
    checked = 0
    for i in range(0, 400):
        j = i + length - 1
        if codes[i] == 32 or codes[j] == 32:
            continue
        excerpt = text[starts[i]:starts[j] + 1]
        spans = attributor.find("¤" + excerpt + "¤")
        assert [(s.start, s.end) for s in spans] == [(1, 1 + len(excerpt))], i
        assert any(m.source.path == "pkg/mod1.py" and m.source_start == starts[i] for m in spans[0].matches)
        checked += 1
    assert checked > 200


def test_same_code_in_two_files_lists_both_and_merges_adjacent_matches(corpus, tmp_path):
    repo, text = corpus[1]["pkg/mod3.py"]
    other = unseen_code(99)
    rows = [{"content": text, "max_stars_repo_name": "a/original", "max_stars_repo_path": "x.py", "id": "1"},
            {"content": text, "max_stars_repo_name": "b/fork", "max_stars_repo_path": "x.py", "id": "2"},
            {"content": other, "max_stars_repo_name": "c/other", "max_stars_repo_path": "y.py", "id": "3"}]
    write_parquet(tmp_path / "data" / "python" / "part.parquet", rows)
    build_index(tmp_path / "data", tmp_path / "idx", workers=1)
    attributor = Attributor(tmp_path / "idx")
    first, second = text[:400], other[-300:]
    spans = attributor.find(first + second)
    assert len(spans) == 1  # the two adjacent matches form one maximal span
    span = spans[0]
    assert (span.start, span.end) == (0, len(first + second.rstrip()))
    by_repo = {m.source.repository: m for m in span.matches}
    assert set(by_repo) == {"a/original", "b/fork", "c/other"}
    assert (by_repo["a/original"].start, by_repo["a/original"].end) == (0, len(first.rstrip()))
    assert by_repo["c/other"].end == span.end
    assert by_repo["c/other"].source_start == len(other) - 300 + (len(second) - len(second.lstrip()))
    assert attributor.find(first + second, max_sources=1)[0].matches[0].source.repository == "a/original"


def test_hash_hits_are_confirmed_against_the_source_text(attributor, monkeypatch):
    """Windows that the Bloom filter and the sorted table both claim are still checked character by
    character: fake every window's fingerprint as a stored one and nothing is reported."""
    stored = np.asarray(attributor.index.hashes)
    monkeypatch.setattr(lookup, "window_hashes", lambda codes, window: stored[np.arange(len(codes) - window + 1)
                                                                              % len(stored)])
    document = unseen_code(5)
    positions, _ = attributor._candidates(lookup.window_hashes(normalise(document)[0], WINDOW))
    assert len(positions) > 100  # the membership structures said yes ...
    assert attributor.find(document) == []  # ... and the text said no


def test_parallel_build_is_identical_to_serial(corpus, index, tmp_path):
    out = tmp_path / "parallel"
    build_index(corpus[0], out, window=WINDOW, stride=STRIDE, workers=2, default_license="PSF-2.0")
    for name in ("hashes.npy", "ordinals.npy", "bloom.npy", "texts.bin"):
        assert (out / name).read_bytes() == (index / name).read_bytes(), name
    serial = json.loads((index / "manifest.json").read_text())
    parallel = json.loads((out / "manifest.json").read_text())
    assert serial["files"] == parallel["files"]


def test_exclude_leaves_files_out(corpus, tmp_path):
    keys = tmp_path / "validation_files.tsv"
    keys.write_text("python\tid4\npython\tid6\n")
    build_index(corpus[0], tmp_path / "idx", workers=1, exclude={"id4", "id6"})
    attributor = Attributor(tmp_path / "idx")
    assert attributor.num_sources == 9
    assert attributor.find(corpus[1]["pkg/mod4.py"][1]) == []
    assert attributor.find(corpus[1]["pkg/mod5.py"][1]) != []
    assert main(["index", "build", "--data", str(corpus[0]), "--out", str(tmp_path / "cli"), "--workers", "1",
                 "--exclude", str(keys)]) == 0
    assert Attributor(tmp_path / "cli").num_sources == 9


@pytest.mark.parametrize("damage, message", [
    ("flip hashes", "SHA-256"),
    ("truncate texts", "truncated"),
    ("remove sources", "missing"),
    ("garble manifest", "corrupted index manifest"),
    ("edit manifest", "checksum"),
])
def test_damaged_index_is_rejected(index, tmp_path, damage, message):
    copy = tmp_path / "copy"
    shutil.copytree(index, copy)
    if damage == "flip hashes":
        data = bytearray((copy / "hashes.npy").read_bytes())
        data[-5] ^= 0x10
        (copy / "hashes.npy").write_bytes(bytes(data))
    elif damage == "truncate texts":
        data = (copy / "texts.bin").read_bytes()
        (copy / "texts.bin").write_bytes(data[:-100])
    elif damage == "remove sources":
        (copy / "sources.parquet").unlink()
    elif damage == "garble manifest":
        (copy / "manifest.json").write_text((copy / "manifest.json").read_text()[:-40])
    elif damage == "edit manifest":
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["window"] = 40
        (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AttributionIndexError, match=message) as error:
        Attributor(copy)
    assert "rebuild the index" in str(error.value) or "not a" in str(error.value)


def test_corrupted_text_found_at_lookup_without_verification(index, corpus, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(index, copy)
    data = bytearray((copy / "texts.bin").read_bytes())
    for i in range(0, len(data), 7):
        data[i] ^= 0xFF
    (copy / "texts.bin").write_bytes(bytes(data))
    attributor = Attributor(copy, verify=False)  # sizes still match; contents are not hashed
    with pytest.raises(AttributionIndexError, match="corrupted"):
        attributor.find(corpus[1]["pkg/mod1.py"][1])


def test_default_is_the_embedded_models_index(index, tmp_path, monkeypatch):
    import stablecode.registry

    monkeypatch.setattr(stablecode.registry, "EMBEDDED_MODELS_DIR", tmp_path / "models")
    with pytest.raises(AttributionIndexError, match="scripts/nano/build_index.sh"):
        Attributor()
    shutil.copytree(index, tmp_path / "models" / "stablecode-nano" / "attribution-index")
    assert Attributor().num_sources == 11
    assert Attributor("stablecode-nano").num_sources == 11  # an embedded model's name
    assert Attributor(tmp_path / "models" / "stablecode-nano").num_sources == 11  # a model directory


def test_missing_index_errors(tmp_path):
    with pytest.raises(AttributionIndexError, match="no such attribution index"):
        Attributor(tmp_path / "nowhere")
    with pytest.raises(AttributionIndexError, match="not an attribution index"):
        Attributor(tmp_path)


def test_bad_corpora_are_rejected_clearly(tmp_path):
    with pytest.raises(StablecodeError, match="no parquet files"):
        build_index(tmp_path, tmp_path / "idx", workers=1)
    write_parquet(tmp_path / "python" / "a.parquet", [{"text": "x" * 100}])
    with pytest.raises(StablecodeError, match="no 'content' column"):
        build_index(tmp_path, tmp_path / "idx", workers=1)
    (tmp_path / "python" / "a.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(StablecodeError, match="not a readable parquet file"):
        build_index(tmp_path, tmp_path / "idx", workers=1)
    write_parquet(tmp_path / "python" / "a.parquet", [{"content": b"bytes", "id": "1"}])
    with pytest.raises(StablecodeError, match="holds binary, not text"):
        build_index(tmp_path, tmp_path / "idx", workers=1)
    write_parquet(tmp_path / "python" / "a.parquet", [{"content": None, "id": "1"}])
    with pytest.raises(StablecodeError, match="empty corpus"):
        build_index(tmp_path, tmp_path / "idx", workers=1)
    assert not (tmp_path / "idx").exists()
    assert not list(tmp_path.glob(".idx.*"))  # no staging directory left behind


def test_rebuild_replaces_the_index_atomically(corpus, tmp_path):
    out = tmp_path / "idx"
    build_index(corpus[0], out, workers=1, stride=64)
    build_index(corpus[0], out, workers=1, stride=16)
    assert Attributor(out).stride == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_cli_attribute_prints_spans_and_json(index, corpus, tmp_path, capsys):
    repo, text = corpus[1]["pkg/mod8.py"]
    document = tmp_path / "doc.py"
    document.write_text("# mine\n" + text[200:700] + "\n# end\n", encoding="utf-8")
    assert main(["attribute", str(document), "--index", str(index)]) == 0
    out = capsys.readouterr().out
    assert "1 span found in the training data" in out
    assert f"from {repo}/pkg/mod8.py (PSF-2.0), lines" in out
    assert main(["attribute", str(document), "--index", str(index), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sources"][0]["path"] == "pkg/mod8.py"
    (start, end), = result["spans"]
    assert document.read_text(encoding="utf-8")[start:end] == text[200:700].strip()
    assert main(["index", "info", str(index)]) == 0
    assert "always found             shared stretches of 81+" in capsys.readouterr().out
    assert main(["attribute", str(tmp_path / "missing.py"), "--index", str(index)]) == 2
    assert "cannot read" in capsys.readouterr().err
