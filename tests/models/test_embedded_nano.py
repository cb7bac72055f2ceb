"""The embedded stablecode-nano as shipped: `stablecode complete` never waits for a C++ build."""

import os
import subprocess
import sys
from pathlib import Path


def test_complete_needs_no_compiled_kernels(tmp_path):
    env = dict(os.environ, STABLECODE_KERNELS_DIR=str(tmp_path / "kernels"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    done = subprocess.run([sys.executable, "-m", "stablecode.cli", "complete", "def add(a, b):", "--max-new-tokens", "8"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "compiling" not in done.stderr
    assert not any(Path(tmp_path).rglob("*.so"))
