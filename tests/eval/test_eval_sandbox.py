"""The sandbox against hostile programs: each fails alone, the run goes on, nothing is left behind."""

import os
import socket
import textwrap
from pathlib import Path

import pytest

from stablecode.eval.execution import Limits, Sandbox, processes_of

ALL_FEATURES = {"private_user", "mount_namespace", "pid_namespace", "network_namespace"}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, limits=Limits(timeout=1.0, memory_bytes=512 << 20, processes=16)) as box:
        yield box


def slot_uids(sandbox):
    return [uid for uid in list(sandbox._slots.queue) if uid is not None]


def test_features_as_root(sandbox):
    if os.geteuid() != 0:
        pytest.skip("the full set of protections needs root (CI runs as root)")
    assert sandbox.features == ALL_FEATURES, sandbox.notes
    assert sandbox.notes == []


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """A sibling directory with a file the programs try to destroy, and the evaluator's working directory."""
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    victim = sibling / "victim.txt"
    victim.write_text("precious")
    cwd = tmp_path / "evaluator-cwd"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("keep")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("STABLECODE_TEST_SECRET", "hunter2")
    return sibling, victim, cwd


def test_hostile_programs_fail_alone(sandbox, outside):
    sibling, victim, cwd = outside
    me = os.getpid()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0)
    port = listener.getsockname()[1]
    escape = f"/tmp/stablecode-escape-{me}"

    programs = {
        "good": "def f():\n    return 1\nassert f() == 1\n",
        "assert": "assert 1 == 2\n",
        "syntax": "def f(:\n",
        "sys.exit(0)": "import sys\nsys.exit(0)\nassert False\n",
        "os._exit(0)": "import os\nos._exit(0)\n",
        "infinite loop": "while True:\n    pass\n",
        "ignores its alarm": "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n",
        "fork bomb": textwrap.dedent("""\
            import os, time
            n = 0
            for _ in range(200):  # bounded here too, in case the limit were not
                try:
                    pid = os.fork()
                except OSError:
                    break
                if pid == 0:
                    time.sleep(60)
                    os._exit(0)
                n += 1
            raise AssertionError(f"forked {n}")
            """),
        "memory hog": "chunks = []\nfor _ in range(16):  # 4 GiB unless stopped\n    chunks.append(bytearray(256 << 20))\n",
        "kills its parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nassert False, 'survived'\n",
        "kills the evaluator": f"import os, signal\nos.kill({me}, signal.SIGKILL)\n",
        "kills everything it may": "import os, signal\nos.kill(-1, signal.SIGKILL) if os.getuid() != 0 else None\n"
                                   "assert False\n",
        "deletes outside": f"import os\nos.remove({str(victim)!r})\n",
        "overwrites outside": f"open({str(victim)!r}, 'w').write('gone')\n",
        "writes beside": f"open({str(sibling / 'new.txt')!r}, 'w').write('x')\n",
        "removes the directory": f"import shutil\nshutil.rmtree({str(sibling)!r})\n",
        "writes the evaluator's cwd": f"open({str(cwd / 'new.txt')!r}, 'w').write('x')\n",
        "writes /tmp": f"open({escape!r}, 'w').write('x')\n",
        "daemonises": textwrap.dedent(f"""\
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    for _ in range(100):
                        time.sleep(0.05)
                        try:
                            open({str(sibling / 'daemon.txt')!r}, 'w').write('alive')
                        except OSError:
                            pass
                    os._exit(0)
                os._exit(0)
            time.sleep(0.2)
            os._exit(0)
            """),
        "network": textwrap.dedent(f"""\
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=0.5)
            except OSError:
                pass
            else:
                raise AssertionError("reached the host's network")
            """),
        "clean environment": "import os\nassert 'STABLECODE_TEST_SECRET' not in os.environ\n"
                             "assert 'hunter2' not in repr(dict(os.environ))\n",
        "own empty directory": "import os\nassert os.listdir('.') == []\nassert os.environ['HOME'] == os.getcwd()\n"
                               "open('scratch.txt', 'w').write('mine')\nassert open('scratch.txt').read() == 'mine'\n",
        "noisy but good": "import sys\nfor i in range(10000):\n    print('x' * 100)\n    print('y', file=sys.stderr)\n",
        "good at the end": "assert sum(range(10)) == 45\n",
    }
    names = list(programs)
    results = {names[i]: r for i, r in sandbox.run_many(programs.values())}

    passing = {"good", "network", "clean environment", "own empty directory", "noisy but good", "good at the end"}
    assert {n for n, r in results.items() if r.passed} == passing, {n: r.result for n, r in results.items()}
    assert results["assert"].result == "failed: AssertionError: "
    assert results["syntax"].result.startswith("failed: SyntaxError")
    assert results["sys.exit(0)"].result == "failed: SystemExit: 0"
    assert results["os._exit(0)"].result == "failed: exited with status 0 before its tests finished"
    assert results["infinite loop"].result == "timed out"
    assert results["ignores its alarm"].result == "timed out"
    forked = results["fork bomb"].result
    assert forked.startswith("failed: AssertionError: forked "), forked
    if "private_user" in sandbox.features:
        assert int(forked.rsplit(" ", 1)[1]) < 16  # RLIMIT_NPROC, not the program's own bound of 200
    assert "MemoryError" in results["memory hog"].result
    assert results["kills its parent"].result == "failed: AssertionError: survived"
    assert results["kills the evaluator"].result.startswith("failed: ")
    for name in ("deletes outside", "overwrites outside", "writes beside", "removes the directory",
                 "writes the evaluator's cwd", "writes /tmp"):
        assert results[name].result.startswith(("failed: PermissionError", "failed: OSError")), results[name]
    assert not results["daemonises"].passed

    # The machine and the working directory are untouched.
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in sibling.iterdir()) == ["victim.txt"]
    assert sorted(p.name for p in cwd.iterdir()) == ["keep.txt"]
    assert not os.path.exists(escape)
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()
    # Nothing is left running: not the fork bomb's children, not the daemon.
    for uid in slot_uids(sandbox):
        assert processes_of(uid=uid) == []
    assert os.listdir(sandbox._base) == []  # every run's directory removed


def test_what_the_program_can_see(sandbox):
    """Its own processes only, and of the invoking user's home only the Python installation bound back."""
    if not {"mount_namespace", "pid_namespace"} <= sandbox.features:
        pytest.skip("needs the mount and pid namespaces")
    home = sandbox._hide[0]
    visible = sorted({Path(p).relative_to(home).parts[0] for p in sandbox._keep if p.startswith(home + "/")})
    program = (f"import os\nassert os.listdir({home!r}) == {visible!r}, os.listdir({home!r})\n"
               "assert [p for p in os.listdir('/proc') if p.isdigit()] == ['1'], os.listdir('/proc')\n")
    assert sandbox.run(program).result == "passed"


def test_daemon_is_gone_for_good(sandbox, tmp_path):
    """A daemon that would write into the (world-writable) scratch area later: it never gets to."""
    marker = tmp_path / "marker"
    tmp_path.chmod(0o777)
    program = textwrap.dedent(f"""\
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(1.0)
                open({str(marker)!r}, 'w').write('alive')
                os._exit(0)
        os._exit(0)
        """)
    result = sandbox.run(program)
    assert not result.passed
    import time

    time.sleep(1.5)
    assert not marker.exists()


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout"):
        Limits(timeout=0)
    with pytest.raises(ValueError, match="memory"):
        Limits(memory_bytes=1 << 20)
    with pytest.raises(ValueError, match="workers"):
        Sandbox(workers=0)
