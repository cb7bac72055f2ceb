"""Names to model directories: a Hub id whose snapshot `hf download` left in the local cache loads
offline, through load_model, load_tokenizer and Completer alike."""

import shutil
from pathlib import Path

import pytest
import torch

from stablecode import Completer, load_model, load_tokenizer
from stablecode.errors import CheckpointError
from stablecode.registry import RELEASED_MODEL, resolve_model_dir


def fake_hub_cache(root: Path, repo_id: str, checkpoint: Path, revision: str = "0123456789abcdef") -> Path:
    """The layout `hf download` leaves: blobs by hash, snapshots/<commit>/ of symlinks to them, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(checkpoint.iterdir())):
        blob = repo / "blobs" / f"blob{i:04d}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_a_hub_id_in_the_local_cache_loads_offline(tmp_path, monkeypatch, tiny_checkpoint):
    hub = pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, RELEASED_MODEL, tiny_checkpoint)
    # The real client sees a valid cache entry there, as after `hf download`.
    assert hub.try_to_load_from_cache(RELEASED_MODEL, "config.json", cache_dir=cache) == str(snapshot / "config.json")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir(RELEASED_MODEL) == snapshot
    model = load_model(RELEASED_MODEL)
    reference = load_model(tiny_checkpoint)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))
    assert load_tokenizer(RELEASED_MODEL).vocab_size == load_tokenizer(tiny_checkpoint).vocab_size
    assert Completer(RELEASED_MODEL).complete("def f():", max_new_tokens=4).text == \
        Completer(tiny_checkpoint).complete("def f():", max_new_tokens=4).text
    # HF_HOME/hub is the default cache location when HF_HUB_CACHE is not set.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    shutil.copytree(cache, tmp_path / "home" / "hub", symlinks=True)
    assert resolve_model_dir(RELEASED_MODEL) == tmp_path / "home" / "hub" / snapshot.relative_to(cache)


def test_a_hub_id_not_in_the_cache_says_how_to_download_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError) as error:
        load_model(RELEASED_MODEL)
    message = str(error.value)
    assert "not in the Hugging Face cache" in message
    assert "hf download stabilityai/stablecode-completion-alpha-3b-4k" in message
