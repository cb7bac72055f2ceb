"""POST /overlap (llm-vscode's code attribution) on the completion server: mounted with an index,
behind the same API key and Host check, its document validated like a prompt."""

import random

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving import running
from stablecode.server import create_app


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(4, 9)))


def training_file(seed: int) -> str:
    """Python-like code with random identifiers: no 50-character stretch repeats by chance."""
    rng = random.Random(seed)
    lines = [f"# {_word(rng)}: héllo ✓"]
    for _ in range(12):
        lines.append(f"def {_word(rng)}({_word(rng)}, {_word(rng)}={rng.randint(0, 99)}):")
        lines += [f"    {_word(rng)} = {_word(rng)}({_word(rng)}, {rng.randint(0, 999)})" for _ in range(3)]
        lines.append(f"    return {_word(rng)}\n")
    return "\n".join(lines)


TRAINING_FILES = [training_file(i) for i in range(3)]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from stablecode.attribution import build_index

    root = tmp_path_factory.mktemp("overlap")
    corpus = root / "corpus" / "python"
    corpus.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"content": text, "max_stars_repo_name": f"owner/repo{i}",
                                          "max_stars_repo_path": f"app/mod{i}.py", "max_stars_count": 1, "id": f"h{i}"}
                                         for i, text in enumerate(TRAINING_FILES)]),
               corpus / "train-00000-of-00001.parquet")
    build_index(root / "corpus", root / "index", workers=1)
    return root / "index"


@pytest.fixture(scope="module")
def overlap_server(tiny_checkpoint, index_dir, one_torch_thread):
    from stablecode.attribution import Attributor

    app = create_app(tiny_checkpoint, api_key="k", max_batch=1, attributor=Attributor(index_dir))
    with running(app) as server:
        yield server


@pytest.fixture
def c(overlap_server):
    with httpx.Client(base_url=overlap_server.url, headers={"Authorization": "Bearer k"}, timeout=60) as client:
        yield client


def test_overlap_answers_llm_vscode_s_request(c, overlap_server):
    text = TRAINING_FILES[1]
    excerpt = text[100:500].strip()
    document = "x = '😀'  # new code\n" + excerpt + "\n"
    start = document.index(excerpt)
    body = c.post("/overlap", json={"document": document, "parameters": {"ignored": True}}).json()
    assert body["spans"] == [[start + 1, start + 1 + len(excerpt)]]  # UTF-16 offsets: the emoji is 2 units
    assert body["sources"][0]["repository"] == "owner/repo1" and body["sources"][0]["span"] == 0
    assert body["sources"][0]["source_start"] == text.index(excerpt)
    assert c.post("/overlap", json={"document": document, "offset_unit": "codepoint"}).json()["spans"] == \
        [[start, start + len(excerpt)]]
    assert c.post("/overlap", json={"document": "x = 1\n" * 20}).json() == {"spans": [], "sources": []}
    assert c.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_overlap_errors(c, overlap_server):
    assert httpx.post(overlap_server.url + "/overlap", json={"document": "x"}).status_code == 401
    assert c.post("/overlap", json={"text": "no document"}).status_code == 422
    assert c.post("/overlap", json={"document": "x", "max_sources": 0}).status_code == 422
    lone = b'{"document": "def f(\\ud800):"}'
    response = c.post("/overlap", content=lone, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "not valid Unicode" in response.json()["error"]
    limit = overlap_server.engine.limits.max_document_chars
    response = c.post("/overlap", json={"document": "x" * (limit + 1)})
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_no_overlap_route_without_an_index(client):
    assert client.post("/overlap", json={"document": "x = 1\n"}).status_code == 404


@pytest.fixture(scope="module")
def big_files_index(tmp_path_factory):
    """Training files of about 9,000 characters, to see whether a lookup's cost follows them."""
    from stablecode.attribution import build_index

    root = tmp_path_factory.mktemp("big-files")
    (root / "corpus" / "python").mkdir(parents=True)
    files = ["\n".join(training_file(1000 + 7 * i + j) for j in range(5)) for i in range(30)]
    pq.write_table(pa.Table.from_pylist([{"content": text, "max_stars_repo_name": f"o/r{i}",
                                          "max_stars_repo_path": f"m{i}.py", "max_stars_count": 1, "id": str(i)}
                                         for i, text in enumerate(files)]),
                   root / "corpus" / "python" / "train-00000-of-00001.parquet")
    build_index(root / "corpus", root / "index", workers=1)
    return root / "index"


def test_lookup_work_is_linear_in_the_document_not_in_the_matched_files(big_files_index, monkeypatch):
    """A document of many short excerpts (200 characters of 9,000-character files, 100 new ones
    between them): every source character the lookup normalises is counted. Reading each matched
    file whole made that 30x the document; reading around the matches keeps it a small multiple
    (a 1M-character document took 601 s before; scripts/bench/overlap.py times it)."""
    from stablecode.attribution import Attributor, lookup

    attributor = Attributor(big_files_index)
    files = [attributor.source_text(i) for i in range(attributor.num_sources)]
    rng = random.Random(0)
    pieces, excerpts = [], []
    while sum(map(len, pieces)) < 100_000:
        text = rng.choice(files)
        start = rng.randrange(len(text) - 300)
        excerpts.append(text[start:start + 200])
        pieces.append(excerpts[-1] + "".join(rng.choice("xyz ") for _ in range(100)))
    document = "".join(pieces)
    normalised = [0]
    normalise = lookup.normalise

    def counting(text):
        normalised[0] += len(text)
        return normalise(text)

    monkeypatch.setattr(lookup, "normalise", counting)
    spans = attributor.find(document)
    assert normalised[0] - len(document) <= 8 * len(document)
    # Still exact: one span per excerpt, covering it (give or take its whitespace at either end).
    found = [document[s.start:s.end] for s in spans]
    assert len(found) == len(excerpts)
    assert all(excerpt.strip()[1:-1] in span for excerpt, span in zip(excerpts, found))
