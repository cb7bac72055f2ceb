"""stablecode.machine against the machine itself: what /proc/cpuinfo says, and no torch to ask it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stablecode import machine

CPUINFO = Path("/proc/cpuinfo")
needs_cpuinfo = pytest.mark.skipif(not CPUINFO.exists(), reason="no /proc/cpuinfo here")


def first(field: str) -> str:
    line = next(line for line in CPUINFO.read_text().splitlines() if line.split(":")[0].strip() == field)
    return line.split(":", 1)[1].strip()


@needs_cpuinfo
def test_flags_are_the_cpus_own():
    flags = machine.cpu_flags()
    assert flags and flags <= set(first("flags").split())
    assert machine.simd_flags() == [f for f in machine.SIMD_FLAGS if f in flags]


@needs_cpuinfo
def test_the_model_is_the_cpus_model_name():
    assert machine.cpu_model() == first("model name")


@needs_cpuinfo
def test_the_description_names_model_cpus_flags_and_load():
    text = machine.describe_cpu()
    assert text.startswith(first("model name") + ";")
    assert f"{os.cpu_count()} CPUs" in text
    assert "flags: " + (" ".join(machine.simd_flags()) or "no AVX2, AVX-512 or AMX") + ";" in text
    assert "load average " in text


def test_the_kernels_build_for_avx2_exactly_when_the_cpu_has_it():
    from stablecode.kernels.build import simd_level

    assert simd_level() == ("avx2" if {"avx2", "fma", "f16c"} <= machine.cpu_flags() else "generic")


def test_facts_are_json_and_match_the_description():
    facts = json.loads(json.dumps(machine.machine_facts(torch=False)))
    assert facts["cpu"] == machine.cpu_model() and facts["cores"] == os.cpu_count()
    assert facts["flags"] == machine.simd_flags()
    assert len(facts["load_average"]) == 3 and all(v >= 0 for v in facts["load_average"])


def test_only_facts_asked_for_torch_import_it():
    code = ("import sys\n"
            "import stablecode.machine as m\n"
            "m.describe_cpu(); quiet = m.machine_facts(torch=False)\n"
            "print('torch' in sys.modules, quiet['torch'])\n"
            "print(m.machine_facts()['torch'] == __import__('torch').__version__)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["False None", "True"]


def test_without_cpuinfo_nothing_is_claimed(monkeypatch, tmp_path):
    monkeypatch.setattr(machine, "CPUINFO", str(tmp_path / "absent"))
    assert machine.cpu_flags() == set() and machine.simd_flags() == []
    assert machine.cpu_model()  # the architecture at least
    assert "flags: no AVX2, AVX-512 or AMX" in machine.describe_cpu()


FAULTS_OF_A_SECOND_ROUND = """
import ctypes, resource, sys
from stablecode import machine
applied = machine.keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def one_round():  # a layer's activations: blocks of a few sizes, all freed at the end
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size << 20) for size in (10, 5, 20, 2)]
    for block, size in zip(blocks, (10, 5, 20, 2)):
        ctypes.memset(block, 1, size << 20)
    for block in blocks:
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

one_round()
print(applied, one_round())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activation_blocks_are_reused_without_faulting_in_new_pages():
    """By default glibc maps blocks this size afresh each time (37 MB: ~9,500 page faults a round);
    after keep_freed_memory a second round reuses the heap."""
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_SECOND_ROUND, "keep"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "True" and int(out[1]) < 1000


HEAP_LEFT_BEHIND = """
import ctypes, sys
from stablecode import machine
machine.keep_freed_memory()  # freed blocks stay in the heap, as after a checkpoint's temporaries
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def resident_mb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon")).split()[1]) // 1024

blocks = [libc.malloc(4 << 20) for _ in range(64)]
for block in blocks:
    ctypes.memset(block, 1, 4 << 20)
kept = [libc.malloc(4096) for _ in blocks]  # small live blocks between the big ones, as loading leaves
for block in blocks:
    libc.free(block)
before = resident_mb()
print(machine.release_freed_memory(), before, resident_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_freed_memory_gives_the_heaps_free_pages_back():
    applied, before, after = subprocess.run([sys.executable, "-c", HEAP_LEFT_BEHIND], capture_output=True, text=True,
                                            check=True).stdout.split()
    assert applied == "True" and int(before) - int(after) >= 200  # of the 256 MB freed
