"""Building the kernels, as users run into it: first use, a build killed halfway, no compiler.

No command ever waits on another process's build, and a model that needs no kernels (the
embedded one) never builds at all."""

import os
import signal
import subprocess
import sys
import time

import pytest


def environment(kernels_dir, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("STABLECODE_KERNELS_DIR", "STABLECODE_KERNELS")}
    return dict(env, TORCH_EXTENSIONS_DIR=str(kernels_dir), PYTHONIOENCODING="utf-8", **extra)


def complete(*args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "stablecode.cli", "complete", "--max-new-tokens", "4", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_the_embedded_model_never_builds_kernels(tmp_path):
    kernels_dir = tmp_path / "kernels"
    result = complete("def f():", env=environment(kernels_dir), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "compiling" not in result.stderr
    assert not kernels_dir.exists()  # nothing built, nothing locked, nothing to wait for


def test_without_a_compiler_one_short_warning_and_the_slower_path(tmp_path, tiny_checkpoint):
    result = complete("--model", tiny_checkpoint, "--quantize", "int8", "def f():",
                      env=environment(tmp_path / "kernels", CXX=str(tmp_path / "no-such-c++")), timeout=300)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "could not build the CPU kernels" in warnings[0] and "no C++ compiler" in warnings[0]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_build_killed_midway_never_blocks_the_next_run(tmp_path, tiny_checkpoint):
    kernels_dir = tmp_path / "kernels"
    env = environment(kernels_dir)
    args = [sys.executable, "-m", "stablecode.cli", "complete", "--max-new-tokens", "4", "--model",
            str(tiny_checkpoint), "--quantize", "int8", "def f():"]
    # The first run starts compiling; kill -9 it and its compiler in the middle of the build.
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(kernels_dir.glob(".build-*/*.ninja")) and time.monotonic() < deadline:
        assert first.poll() is None, first.stderr.read().decode()
        time.sleep(0.2)
    assert list(kernels_dir.glob(".build-*")), "the first run never started building"
    time.sleep(2)  # the compiler is running now
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not list(kernels_dir.glob("*.so"))  # it died before finishing

    # The next run neither waits on the dead build nor trips over its leftovers: it builds its own.
    started = time.monotonic()
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert len(list(kernels_dir.glob("*.so"))) == 1
    assert not list(kernels_dir.glob(f".build-{first.pid}-*"))  # the dead process's directory is swept
    # And the one after that loads the finished library without compiling.
    third = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "compiling" not in third.stderr, third.stderr
    print(f"rebuild after the killed build took {time.monotonic() - started:.0f} s")
