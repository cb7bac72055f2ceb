"""The served files rewritten in place (a new checkpoint or index copied over the old one): the
server keeps answering from what it loaded instead of dying of SIGBUS on a mapped page."""

import shutil
import signal
import socket
import subprocess
import sys

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from serving import wait_for
from test_overlap import TRAINING_FILES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_rewriting_the_served_weights_and_index_in_place_does_not_kill_the_server(tiny_checkpoint, tmp_path):
    from stablecode.attribution import build_index

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    (tmp_path / "corpus" / "python").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"content": text, "max_stars_repo_name": "o/r", "max_stars_repo_path": "m.py",
                                          "max_stars_count": 1, "id": str(i)} for i, text in enumerate(TRAINING_FILES)]),
                   tmp_path / "corpus" / "python" / "train-00000-of-00001.parquet")
    index = tmp_path / "index"
    build_index(tmp_path / "corpus", index, workers=1)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "stablecode.cli", "serve", "--model", str(model), "--index",
                                str(index), "--port", str(port), "--threads", "1", "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: _ready(url) or process.poll() is not None, 90, 0.2) and process.poll() is None
        body = {"inputs": "def f(x):\n", "parameters": {"max_new_tokens": 8}}
        before = httpx.post(url + "/generate", json=body, timeout=30).json()["generated_text"]
        document = TRAINING_FILES[0][50:400]
        spans = httpx.post(url + "/overlap", json={"document": document}, timeout=30).json()["spans"]
        assert spans
        # Rewrite in place (same inodes), as `cp new old` does: truncate, then other bytes.
        for path in [model / "model.safetensors", *index.iterdir()]:
            size = path.stat().st_size
            with open(path, "r+b") as f:
                f.truncate(0)
                f.write(b"\0" * (size // 2))
        after = httpx.post(url + "/generate", json=body, timeout=30)
        assert after.status_code == 200 and after.json()["generated_text"] == before
        assert httpx.post(url + "/overlap", json={"document": document}, timeout=30).json()["spans"] == spans
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
