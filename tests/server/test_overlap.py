"""`serve --index`: the attribution route (stablecode.attribution) is mounted on the completion
server and sits behind the same API key."""

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from serving import running
from stablecode.server import create_app

TRAINING_FILE = "".join(f"def handler_{i}(request, retries={i}):\n    return dispatch(request, 'route_{i}', retries)\n"
                        for i in range(12))


def test_overlap_route_answers_from_the_index(tiny_checkpoint, tmp_path):
    from stablecode.attribution import Attributor, build_index

    corpus = tmp_path / "corpus" / "python"
    corpus.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"content": TRAINING_FILE, "max_stars_repo_name": "owner/repo",
                                          "max_stars_repo_path": "app/handlers.py", "max_stars_count": 1,
                                          "id": "h1"}]), corpus / "train-00000-of-00001.parquet")
    build_index(tmp_path / "corpus", tmp_path / "index", workers=1)
    app = create_app(tiny_checkpoint, api_key="k", max_batch=1, attributor=Attributor(tmp_path / "index"))
    with running(app) as server, httpx.Client(base_url=server.url, headers={"Authorization": "Bearer k"}) as c:
        copied = "# my code\n" + TRAINING_FILE[100:400] + "\nprint('new')\n"
        spans = c.post("/overlap", json={"document": copied}).json()["spans"]
        assert spans and all(0 <= start < end <= len(copied) for start, end in spans)
        assert c.post("/overlap", json={"document": "x = 1\n" * 20}).json()["spans"] == []
        assert httpx.post(server.url + "/overlap", json={"document": copied}).status_code == 401
        assert c.post("/overlap", json={"text": copied}).status_code == 422
        assert c.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).status_code == 200
