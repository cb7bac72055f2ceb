"""Compiling `cpu_kernels.cpp` once per machine, and loading it.

The library is built by the first process that needs it, in a directory of its own, and renamed
into the cache only when complete. Nobody ever waits on a lock: a process killed mid-build leaves
only its private build directory behind (removed by a later build), and two processes that build
at once each finish their own and the last rename wins (the files are identical).

The cache is `$STABLECODE_KERNELS_DIR`, else `$TORCH_EXTENSIONS_DIR`, else
`~/.cache/stablecode/kernels`; one file per source/flags/torch/Python combination.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from stablecode.machine import cpu_flags

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
BUILD_PREFIX = ".build-"

_library = None
_attempted = False


def simd_level() -> str:
    """The instruction set the kernels are compiled for, from this CPU's flags."""
    return "avx2" if {"avx2", "fma", "f16c"} <= cpu_flags() else "generic"


def cache_dir() -> Path:
    root = os.environ.get("STABLECODE_KERNELS_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stablecode" / "kernels"


def _flags(simd: str) -> list[str]:
    return ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if simd == "avx2" else [])


def library_path() -> tuple[str, Path]:
    """(module name, cached file) of the library for this machine, source and torch build."""
    import torch

    simd = simd_level()
    name = f"stablecode_cpu_kernels_{simd}"
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_flags(simd)).encode(), torch.__version__.encode(),
                 sys.version.encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    return name, cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"


def _import(name: str, path: Path):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_dead_builds(directory: Path) -> None:
    for stale in directory.glob(f"{BUILD_PREFIX}*"):
        try:
            pid = int(stale.name[len(BUILD_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def _missing_tool() -> str | None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) found"
    if shutil.which("ninja") is None:
        return "ninja not found"
    return None


def _build(name: str, target: Path):
    from torch.utils.cpp_extension import load

    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_builds(target.parent)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{BUILD_PREFIX}{os.getpid()}-"))
    try:
        print("stablecode: compiling the CPU kernels (first use on this machine, about a minute)", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's compiler-version notices: the outcome is reported below
            module = load(name=name, sources=[str(SOURCE)], extra_cflags=_flags(simd_level()),
                          build_directory=str(staging), verbose=False)
        built = Path(module.__file__)
        os.chmod(built, 0o755)
        os.replace(built, target)
        return module
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# Decoding a model this large (or a quantized one) is bound by streaming its weights, and the
# kernels pay for their one-time build (about a minute). A smaller model (the embedded one) uses
# them only if a previous run already built them: its first completion never waits for a compiler.
BUILD_MIN_PARAMETERS = 100_000_000


def worth_building(num_parameters: int, quantized: bool = False) -> bool:
    return quantized or num_parameters >= BUILD_MIN_PARAMETERS


def load_for(num_parameters: int, quantized: bool = False):
    """The kernels for decoding a model of this size: built if it is quantized or large, else only
    loaded if already built (None otherwise, silently)."""
    return load(build=worth_building(num_parameters, quantized))


def load(build: bool = True):
    """The compiled kernels, built on first use on this machine; None (after one short warning)
    where they cannot be built. With build=False, only a library already in the cache is loaded.
    STABLECODE_KERNELS=torch skips them (PyTorch's own ops, for comparisons)."""
    global _library, _attempted
    if _attempted:
        return _library
    if os.environ.get("STABLECODE_KERNELS", "native") == "torch":
        _attempted = True
        return None
    import torch  # noqa: F401  (the library links against libtorch: load it first)

    name, path = library_path()
    if not build and not path.exists():
        return None  # not attempted: a later caller that needs the kernels may still build them
    _attempted = True
    try:
        if path.exists():
            _library = _import(name, path)
            return _library
        problem = _missing_tool()
        if problem is None:
            _library = _build(name, path)
            return _library
    except Exception as e:  # compiler error, unreadable cache, ...: all mean the same to the user
        text = str(e).strip()
        problem = text.splitlines()[0][:200] if text else type(e).__name__
    print(f"stablecode: warning: could not build the CPU kernels ({problem}); decoding uses PyTorch's "
          "slower ops (install a C++ compiler and ninja for full speed)", file=sys.stderr)
    return None


def loaded():
    """The kernels if this process has loaded them, else None: never builds, never waits."""
    return _library
