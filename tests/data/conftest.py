"""Small synthetic source trees and corpora for the data pipeline tests."""

from pathlib import Path

import pytest

MIT_TEXT = """MIT License

Copyright (c) 2024 Someone

Permission is hereby granted, free of charge, to any person obtaining a copy of this software ...
"""


def _write_tree(root: Path, files: dict) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode("utf-8")
        path.write_bytes(content)
    return root


def _python_module(i: int) -> str:
    """A distinct, plausible Python file."""
    return (f'"""Module number {i}: helpers for item {i}."""\n\n'
            f"import os\n\n\ndef compute_{i}(values, scale={i}):\n"
            f"    total = 0\n    for v in values:\n        total += v * scale  # accumulate {i}\n"
            f"    return total\n\n\nclass Widget{i}:\n    def __init__(self, name='w{i}'):\n"
            f"        self.name = name\n        self.size = {i * 7 % 13}\n\n"
            f"    def describe(self):\n        return f'{{self.name}} has size {{self.size}} ✓ ünïcode'\n")


@pytest.fixture
def write_tree():
    """write_tree(root, {relative path: str or bytes}) -> root"""
    return _write_tree


@pytest.fixture
def python_module():
    """python_module(i) -> the text of a distinct Python file"""
    return _python_module


@pytest.fixture
def code_tree(tmp_path):
    """A tree with one file per stage-1 language, an MIT LICENSE, and several Python modules."""
    files = {
        "LICENSE": MIT_TEXT,
        "src/Main.java": "public class Main {\n    public static void main(String[] args) {\n"
                         "        System.out.println(\"hi\");\n    }\n}\n",
        "web/app.js": "export function add(a, b) {\n  return a + b;\n}\n",
        "web/types.ts": "export interface Point {\n  x: number;\n  y: number;\n}\n",
        "site/index.php": "<?php\nfunction greet($name) {\n    return \"Hello $name\";\n}\n",
        "db/schema.sql": "CREATE TABLE users (\n  id INTEGER PRIMARY KEY,\n  name TEXT NOT NULL\n);\n",
        "rs/lib.rs": "pub fn square(x: i32) -> i32 {\n    x * x\n}\n",
        "csrc/util.c": "#include <stdio.h>\nint twice(int x) { return 2 * x; }\n",
        "csrc/util.h": "int twice(int x);\n",
        "cpp/vec.cc": "#include <vector>\nint sum(const std::vector<int>& v) {\n"
                      "    int s = 0;\n    for (int x : v) s += x;\n    return s;\n}\n",
        "README.md": "# Project\n\nSome words about the project.\n",
        "go/main.go": "package main\n\nfunc main() {\n\tprintln(\"go\")\n}\n",
        "scripts/build.sh": "#!/bin/sh\nset -e\necho building\n",
        "scripts/run": "#!/usr/bin/env bash\necho running\n",
    }
    for i in range(12):
        files[f"pkg/mod_{i:02d}.py"] = _python_module(i)
    return _write_tree(tmp_path / "tree", files)


@pytest.fixture
def python_corpus(tmp_path):
    """A python-only starcoderdata-layout corpus with many small row groups (many pack units)."""
    from stablecode.data.sources import from_dir

    files = {f"lib/m{i:02d}.py": _python_module(i) for i in range(40)}
    files["lib/special.py"] = 'EOS = "<|endoftext|>"  # the literal text of a special token\n'
    tree = _write_tree(tmp_path / "pytree", files)
    out = tmp_path / "corpus"
    from_dir(tree, out, languages=["python"], license="MIT", row_group_rows=4)
    return out


@pytest.fixture
def corpus_tokenizer(python_corpus, tmp_path):
    from stablecode.data.tokenizer_train import train_tokenizer

    out = tmp_path / "tokenizer.json"
    train_tokenizer(python_corpus, out, vocab_size=400, validation_fraction=0.0, mix=None)
    return out
