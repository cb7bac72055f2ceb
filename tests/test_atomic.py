"""Write-then-rename: a failed write leaves the old file (or directory) exactly as it was."""

import os
import stat
import subprocess
import sys

import pytest

from stablecode.atomic import atomic_open, atomic_path, atomic_write_text, staged_directory


def test_write_replaces_whole_file_and_follows_the_umask(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's private 0600
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "wb") as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    target = tmp_path / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"png")
        assert not target.exists()
    assert target.read_bytes() == b"png"


def test_staged_directory_replaces_only_when_complete(tmp_path):
    out = tmp_path / "index"
    with staged_directory(out) as staging:
        (staging / "a").write_text("1")
        (staging / "nested").mkdir()
        (staging / "nested" / "b").write_text("2")
    assert (out / "a").read_text() == "1" and (out / "nested" / "b").read_text() == "2"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    with pytest.raises(KeyboardInterrupt):
        with staged_directory(out) as staging:
            (staging / "a").write_text("partial")
            raise KeyboardInterrupt
    assert (out / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_atomic_module_does_not_import_torch():
    code = "import sys, stablecode.atomic, stablecode.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
