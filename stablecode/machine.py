"""This machine's CPU: its model, its instruction-set flags and how busy it is; and the one process
setting CPU inference needs from the C library (`keep_freed_memory`).

One place for what the benchmarks print beside their numbers and for what the kernel build reads
to pick its instruction set. Torch-free: importing it imports nothing beyond the standard library.
"""

from __future__ import annotations

import os
import platform
import sys

CPUINFO = "/proc/cpuinfo"

# The flags that decide which kernels and GEMMs run here, in the order they are reported.
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
              "amx_int8")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none, as off Linux)."""
    fields: dict[str, str] = {}
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break  # the first processor's block is enough: the others repeat it
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> set[str]:
    """Every flag the CPU reports (x86 `flags`, Arm `Features`); empty where unknown."""
    fields = _cpuinfo()
    return set((fields.get("flags") or fields.get("Features") or "").split())


def simd_flags() -> list[str]:
    """The flags of SIMD_FLAGS this CPU has, in SIMD_FLAGS's order."""
    flags = cpu_flags()
    return [f for f in SIMD_FLAGS if f in flags]


def cpu_model() -> str:
    """The CPU's model name, e.g. 'Intel(R) Xeon(R) Platinum 8488C'; the architecture if unknown."""
    fields = _cpuinfo()
    return (fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()
            or "unknown CPU")


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15-minute load averages (zeros where the system has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit (HEAP_MAX_SIZE / 2).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MAX_MMAP_THRESHOLD = 32 * 2**20


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MB for reuse rather than return them to the
    kernel. A prefill allocates and frees tens of MB of activations per layer; by default each such
    block is a fresh mmap whose every page faults on first touch, which costs more than the GELU that
    writes it on a VM (docs/performance.md). The process keeps its peak heap instead. Returns whether
    it applied (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> bool:
    """Return the heap's free pages to the kernel now (glibc's malloc_trim). Loading a checkpoint frees
    hundreds of MB of temporaries which malloc keeps, scattered between live blocks, where nothing
    later reuses them: the 3B int8 was left with 0.2-2.1 GB of them (run to run), 7-70% above its
    weights. Returns whether it applied (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim(0)
    return True


def _torch_version(import_torch: bool) -> str | None:
    torch = sys.modules.get("torch")
    if torch is None and import_torch:
        try:
            import torch
        except ImportError:
            return None
    return getattr(torch, "__version__", None)


def describe_cpu() -> str:
    """One line for a benchmark's report: model, CPU count, SIMD flags, load average (and torch's
    version when torch is already imported)."""
    flags = simd_flags()
    parts = [cpu_model(), f"{os.cpu_count()} CPUs", "flags: " + (" ".join(flags) or "no AVX2, AVX-512 or AMX"),
             "load average " + " ".join(f"{v:.2f}" for v in load_average())]
    torch_version = _torch_version(import_torch=False)
    if torch_version:
        parts.append(f"torch {torch_version}")
    return "; ".join(parts)


def machine_facts(torch: bool = True) -> dict:
    """describe_cpu's facts as JSON-able fields: cpu, cores, flags, load_average, machine, python and
    torch (its version; imported here unless `torch` is False, then None unless already imported)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "flags": simd_flags(),
            "load_average": [round(v, 2) for v in load_average()], "machine": platform.machine(),
            "python": platform.python_version(), "torch": _torch_version(torch)}
