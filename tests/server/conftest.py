"""Fixtures of the server tests (helpers are in serving.py)."""

import httpx
import pytest
import torch

from serving import running
from stablecode.server import create_app


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matrices are too small to split: on a shared 2-core machine a second
    thread only adds contention (10x slower steps measured). Restored after each module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, one_torch_thread):
    """A server for one test module: tiny random model, 4 rows, 8 waiting."""
    with running(create_app(tiny_checkpoint, max_batch=4, max_queue=8)) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, one_torch_thread):
    """The library's own greedy completion of the same checkpoint, to compare server answers with."""
    from stablecode.api import Completer

    completer = Completer(tiny_checkpoint)

    def complete(prompt, max_new_tokens, **options):
        return completer.complete(prompt, max_new_tokens=max_new_tokens, **options).text

    return complete


@pytest.fixture(scope="session")
def tiny_fim_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a config saying it was trained for fill-in-the-middle."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("fim") / "tiny-fim"
    shutil.copytree(tiny_checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "stablecode_fim": True}))
    return out


@pytest.fixture(scope="module")
def fim_server(tiny_fim_checkpoint, one_torch_thread):
    with running(create_app(tiny_fim_checkpoint, max_batch=2, max_queue=8)) as s:
        yield s
