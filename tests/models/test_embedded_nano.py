"""The embedded stablecode-nano as shipped: small, trained for FIM, documented to the file, and
answering `stablecode complete` without waiting for a C++ build."""

import json
import os
import subprocess
import sys
from pathlib import Path

from stablecode.checkpoint import load_config
from stablecode.registry import EMBEDDED_MODELS_DIR
from stablecode.tokenizer import load_tokenizer

NANO = EMBEDDED_MODELS_DIR / "stablecode-nano"


def test_it_is_small_and_trained_for_fill_in_the_middle():
    size = sum(p.stat().st_size for p in NANO.rglob("*") if p.is_file())
    assert size < 60 * 2**20, f"{size:,} bytes"
    assert load_config(NANO).fim
    tokenizer = load_tokenizer(NANO)
    assert [tokenizer.backend.token_to_id(t) for t in ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")] \
        == [1, 2, 3, 4]


def test_its_manifest_lists_every_file_with_package_version_licence_and_sha256():
    manifest = json.loads((NANO / "training_manifest.json").read_text())
    files = manifest["files"]
    assert len(files) > 10_000
    assert all(f["package"] and f["version"] and f["path"] and f["license"] and len(f["sha256"]) == 64 for f in files)
    assert {f["split"] for f in files} == {"train", "validation", "heldout-package"}
    held_out = {f["package"] for f in files if f["split"] == "heldout-package"}
    assert held_out and not held_out & {f["package"] for f in files if f["split"] == "train"}
    assert all(d["reason"] for d in manifest["packages_dropped"])


def test_complete_needs_no_compiled_kernels(tmp_path):
    env = dict(os.environ, STABLECODE_KERNELS_DIR=str(tmp_path / "kernels"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    done = subprocess.run([sys.executable, "-m", "stablecode.cli", "complete", "def add(a, b):", "--max-new-tokens", "8"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "compiling" not in done.stderr
    assert not any(Path(tmp_path).rglob("*.so"))


def test_a_prompt_ending_in_a_newline_after_a_def_continues_indented():
    # Without token healing the prompt's "\n" token is one the model rarely saw before code (it learned
    # "\n" + indentation as one token), and the completion restarts at column 0.
    from stablecode import Completer

    completion = Completer("stablecode-nano").complete("def fibonacci(n):\n", max_new_tokens=8)
    assert completion.text.startswith(" ")
