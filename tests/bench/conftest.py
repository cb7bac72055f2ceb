"""The benchmark scripts (scripts/bench/*.py are scripts, not a package), loaded as modules."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "bench"


@pytest.fixture
def bench_script():
    """load(name): scripts/bench/<name>.py as a module."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
