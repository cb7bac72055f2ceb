"""Names to model directories: a checkpoint path, a Hugging Face Hub id already in the local cache,
or the name of a model shipped inside the package. Nothing here downloads."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from stablecode.errors import CheckpointError, StablecodeError

EMBEDDED_MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "stablecode-nano"
RELEASED_MODEL = "stabilityai/stablecode-completion-alpha-3b-4k"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """A checkpoint directory, a Hub id whose snapshot is in the local Hugging Face cache, or the
    name of an embedded model (default: stablecode-nano)."""
    if model is None:
        model = DEFAULT_MODEL
    path = Path(model)
    if path.is_dir():
        return path
    embedded = EMBEDDED_MODELS_DIR / str(model)
    if embedded.is_dir() and (embedded / "config.json").exists():
        return embedded
    if str(model) == DEFAULT_MODEL:
        raise CheckpointError(f"the embedded model {DEFAULT_MODEL!r} is not installed in {embedded}; "
                              "pass --model DIR with a checkpoint directory")
    if HUB_ID.match(str(model)) and not path.exists():
        return hub_snapshot(str(model))
    raise CheckpointError(f"{model}: no such checkpoint directory (and not an embedded model name)")


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repositories: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str, revision: str = "main") -> Path:
    """The cached snapshot of a model repository (`models--org--name/snapshots/<commit>`), as
    `hf download` leaves it; the commit is the one `refs/<revision>` names."""
    cache = hub_cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    how = (f"download it with `hf download {repo_id}` (into this cache) or "
           f"`hf download {repo_id} --local-dir DIR` and pass DIR")
    if not repo.is_dir():
        raise CheckpointError(f"{repo_id}: no such checkpoint directory, and not in the Hugging Face cache "
                              f"({cache}); {how}")
    ref = repo / "refs" / revision
    snapshots = repo / "snapshots"
    if ref.is_file():
        commit = ref.read_text().strip()
        snapshot = snapshots / commit
    else:  # a cache filled without refs (some mirrors): only an unambiguous snapshot will do
        candidates = sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
        if len(candidates) != 1:
            raise CheckpointError(f"{repo_id}: {repo} has no refs/{revision} and {len(candidates)} snapshots; {how}")
        snapshot = candidates[0]
    if not (snapshot / "config.json").is_file():
        raise CheckpointError(f"{repo_id}: the cached snapshot {snapshot} has no config.json "
                              f"(an interrupted download?); {how}")
    return snapshot


def require_regular_file(path: Path, error: type[StablecodeError] = CheckpointError) -> Path:
    """`path` if it is a regular file (or a link to one): a FIFO or device would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise error(f"{path}: is {kind}, not a regular file")
    return path
