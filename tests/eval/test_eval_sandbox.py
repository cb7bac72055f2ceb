"""The sandbox against hostile programs: each fails alone, the run goes on, nothing is left behind."""

import os
import socket
import tempfile
import textwrap
from pathlib import Path

import pytest

from stablecode.eval.execution import Limits, Sandbox, processes_of, remove_tree

ALL_FEATURES = {"private_user", "mount_namespace", "pid_namespace", "network_namespace", "ipc_namespace",
                "memory_tree"}


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
    # Beside which memory accounting ran: uids of the range that other programs use (skipped) at most.
    assert [n for n in sandbox.notes if not n.startswith(("memory:", "uids ["))] == []


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
    assert results["kills its parent"].result == "failed: AssertionError: survived"
    assert results["kills the evaluator"].result.startswith("failed: ")
    for name in ("deletes outside", "overwrites outside", "writes beside", "removes the directory",
                 "writes the evaluator's cwd", "writes /tmp"):
        # Read-only, or (in the mount namespace's new root) not there at all.
        assert results[name].result.startswith(("failed: PermissionError", "failed: OSError",
                                                "failed: FileNotFoundError")), results[name]
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
    import pwd

    home = os.path.realpath(pwd.getpwuid(os.geteuid()).pw_dir)
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


def test_a_daemon_is_stopped_by_the_process_tree_alone(sandbox):
    """Without a pid namespace and a uid of its own to find it by: the launcher is a subreaper, so a
    setsid + double-fork daemon stays in its tree, where the parent finds and stops it."""
    program = textwrap.dedent("""\
        import os, time
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                time.sleep(60)
                os._exit(0)
            os._exit(0)
        os.close(w)
        raise AssertionError(os.read(r, 32).decode())
        """)
    uid = sandbox._slots.get()
    try:
        result = sandbox._run(program, uid, sandbox.features - {"pid_namespace", "private_user"})
    finally:
        sandbox._slots.put(uid)
    daemon = int(result.result.rsplit(" ", 1)[1])
    try:
        with open(f"/proc/{daemon}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), f"the daemon {daemon} is still running ({state})"


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout"):
        Limits(timeout=0)
    with pytest.raises(ValueError, match="memory"):
        Limits(memory_bytes=1 << 20)
    with pytest.raises(ValueError, match="workers"):
        Sandbox(workers=0)


# ---- memory: per process and per program ------------------------------------------------------------

@pytest.fixture(scope="module")
def roomy():
    """A long wall-clock limit: these programs must end by their memory limit, whatever the machine's load."""
    with Sandbox(workers=2, limits=Limits(timeout=60.0, memory_bytes=512 << 20, processes=16)) as box:
        yield box


def test_memory_hog_gets_a_memory_error(roomy):
    program = "chunks = []\nfor _ in range(16):  # 4 GiB unless stopped\n    chunks.append(bytearray(256 << 20))\n"
    result = roomy.run(program)
    assert "MemoryError" in result.result, result


FORKS = textwrap.dedent("""\
    import os, time
    r, w = os.pipe()
    for _ in range({children}):
        if os.fork() == 0:
            os.close(r)
            block = bytearray({mb} << 20)  # zero-filled: every page is touched
            os.write(w, b"x")
            time.sleep(60)
            os._exit(0)
    os.close(w)
    got = b""
    while len(got) < {children}:
        chunk = os.read(r, {children})
        if not chunk:
            break
        got += chunk
    assert len(got) == {children}, f"only {{len(got)}} children allocated"
    time.sleep(2)  # all of them hold their memory now
    """)


def test_memory_is_capped_for_the_whole_program_not_per_process(roomy):
    """4 forked children of 160 MiB each: every process is under the 512 MiB limit, the program is not."""
    result = roomy.run(FORKS.format(children=4, mb=160))
    assert not result.passed
    assert result.result.startswith("failed: memory limit exceeded"), result


def test_which_memory_accounting_ran_is_reported(roomy):
    """A cgroup where one can be made, else the process tree summed by the parent, with the reason."""
    assert len({"memory_cgroup", "memory_tree"} & roomy.features) == 1
    if "memory_tree" in roomy.features:
        assert [n for n in roomy.notes if n.startswith("memory: no cgroup, because ")], roomy.notes


def test_forking_within_the_memory_limit_passes(roomy):
    result = roomy.run(FORKS.format(children=2, mb=100))
    assert result.passed, result


# ---- IPC, sockets ------------------------------------------------------------------------------------

IPC_CREAT, IPC_RMID = 0o1000, 0
IPC_KEY = 0x5EC0000 + os.getpid() % 0x10000
MQ_NAME = f"/stablecode-test-{os.getpid()}"
SHM_PATH = f"/dev/shm/stablecode-test-{os.getpid()}"
IPC_PRELUDE = textwrap.dedent("""\
    import ctypes, errno, os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    """)


def _remove_host_ipc():
    """What a leaking program would leave in the host's IPC namespace (removed so that a failure costs nothing)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for kind, remove in (("shm", libc.shmctl), ("msg", libc.msgctl)):
        for line in Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]:
            key, ident = line.split()[:2]
            if int(key) == IPC_KEY:
                remove(int(ident), IPC_RMID, None)
    libc.mq_unlink(MQ_NAME.encode())
    if os.path.exists(SHM_PATH):
        os.unlink(SHM_PATH)


def _host_ipc_keys(kind):
    return [int(line.split()[0]) for line in Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]]


def test_shared_memory_and_message_queues_die_with_their_program(sandbox):
    create = IPC_PRELUDE + textwrap.dedent(f"""\
        shmid = libc.shmget({IPC_KEY}, 32 << 20, {IPC_CREAT} | 0o666)
        assert shmid >= 0, os.strerror(ctypes.get_errno())
        address = libc.shmat(shmid, None, 0)
        ctypes.memset(address, 0x41, 32 << 20)
        libc.shmdt(ctypes.c_void_p(address))
        queue = libc.msgget({IPC_KEY}, {IPC_CREAT} | 0o666)
        assert queue >= 0, os.strerror(ctypes.get_errno())
        message = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long) + 5)
        ctypes.c_long.from_buffer(message).value = 1
        message[ctypes.sizeof(ctypes.c_long):] = b"hello"
        assert libc.msgsnd(queue, message, 5, 0) == 0, os.strerror(ctypes.get_errno())
        mq = libc.mq_open({MQ_NAME.encode()!r}, os.O_CREAT | os.O_RDWR, 0o666, None)
        assert mq >= 0, os.strerror(ctypes.get_errno())
        assert libc.mq_send(mq, b"hello", 5, 0) == 0
        try:  # POSIX shared memory: a file in /dev/shm (read-only there, or private to this program)
            with open({SHM_PATH!r}, "wb") as f:
                f.write(b"hello")
        except OSError:
            pass
        """)
    look = IPC_PRELUDE + textwrap.dedent(f"""\
        assert libc.shmget({IPC_KEY}, 0, 0) == -1 and ctypes.get_errno() == errno.ENOENT, "shm segment still there"
        assert libc.msgget({IPC_KEY}, 0) == -1 and ctypes.get_errno() == errno.ENOENT, "message queue still there"
        assert libc.mq_open({MQ_NAME.encode()!r}, os.O_RDONLY) == -1 and ctypes.get_errno() == errno.ENOENT, "mq"
        assert not os.path.exists({SHM_PATH!r}), "POSIX shm file still there"
        # System V shared memory is capped in the program's IPC namespace: no segment over its memory limit.
        assert libc.shmget(0, {sandbox.limits.memory_bytes} + 4096, {IPC_CREAT} | 0o600) == -1
        assert ctypes.get_errno() == errno.EINVAL
        """)
    try:
        first = sandbox.run(create)
        assert first.passed, first
        later = sandbox.run(look)
        assert later.passed, later
        assert IPC_KEY not in _host_ipc_keys("shm") and IPC_KEY not in _host_ipc_keys("msg")
        assert not os.path.exists(SHM_PATH)
    finally:
        _remove_host_ipc()


def test_no_access_to_host_unix_sockets(sandbox):
    """A socket file any user may connect to, in a directory any user may enter, and an abstract socket."""
    directory = tempfile.mkdtemp(prefix="stablecode-socket-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "host.sock")
    abstract = f"\0stablecode-test-{os.getpid()}"
    listeners = []
    try:
        for address in (path, abstract):
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(address)
            listener.listen()
            listener.settimeout(0)
            listeners.append(listener)
        os.chmod(path, 0o777)
        program = textwrap.dedent(f"""\
            import socket
            for address in ({path!r}, {abstract!r}):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(address)
                    s.sendall(b"hello from the sandbox")
                except OSError:
                    continue
                raise AssertionError(f"connected to the host socket {{address!r}}")
            """)
        result = sandbox.run(program)
        assert result.passed, result
        for listener in listeners:
            with pytest.raises(BlockingIOError):
                listener.accept()
    finally:
        for listener in listeners:
            listener.close()
        import shutil

        shutil.rmtree(directory)


# ---- clean-up -------------------------------------------------------------------------------------------

def test_a_deep_directory_tree_is_cleaned_up(sandbox):
    """3,000 nested directories (deeper than Python's recursion limit), the deepest one locked."""
    program = "import os\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\n" \
              "open('f', 'w').write('x')\nos.chmod('.', 0)\n"
    result = sandbox.run(program)
    assert result.passed, result
    assert os.listdir(sandbox._base) == []


def test_remove_tree_of_any_depth(tmp_path):
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        tmp_path = Path(tempfile.mkdtemp(dir="/dev/shm"))  # this disk takes ~3 ms per rmdir (discard)
    top = tmp_path / "top"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for i in range(3000):
        os.mkdir("d", dir_fd=fd)
        if i % 500 == 0:
            os.symlink("/", "link", dir_fd=fd)  # never followed
            os.mkfifo("fifo", dir_fd=fd)
        next_fd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = next_fd
    os.close(fd)
    remove_tree(top)
    assert not top.exists()
    assert os.path.isdir("/") and list(tmp_path.iterdir()) == []
    tmp_path.rmdir()


def test_host_processes_under_sandbox_uids_survive(tmp_path):
    """Only the sandbox's own processes are stopped, not whatever else runs under a uid of its range."""
    if os.geteuid() != 0:
        pytest.skip("sandbox uids are used only as root")
    import subprocess

    base = 60200
    before = subprocess.Popen(["sleep", "120"], user=base, group=base)
    after = None
    try:
        with Sandbox(workers=2, limits=Limits(timeout=1.0), uid_base=base) as box:
            uids = slot_uids(box)
            assert base not in uids  # a uid in use is not taken, and the report says so
            assert [n for n in box.notes if n.startswith(f"uids [{base}]")], box.notes
            after = subprocess.Popen(["sleep", "120"], user=uids[0], group=uids[0])
            results = [r for _, r in box.run_many(["assert True\n"] * 4)]
            assert all(r.passed for r in results), results
            assert after.poll() is None, "a host process under a worker's uid was killed"
        assert before.poll() is None, "a host process under a uid of the range was killed"
    finally:
        for proc in (before, after):
            if proc is not None:
                proc.kill()
                proc.wait()


# ---- limits --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("timeout", [float("inf"), 1e-9, float("nan"), -1.0, 0.0, 1e7])
def test_unusable_timeouts_are_refused(timeout):
    with pytest.raises(ValueError, match="timeout"):
        Limits(timeout=timeout)


@pytest.mark.parametrize("value", ["inf", "1e-9", "nan", "-3"])
def test_cli_refuses_unusable_timeouts(tmp_path, capsys, value):
    from stablecode.cli import main

    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": "    return True\\n"}\n')
    assert main(["eval", "humaneval", "--samples", str(samples), "--timeout", value]) == 2
    error = capsys.readouterr().err
    assert "timeout" in error and "between" in error, error
