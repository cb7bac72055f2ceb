"""The child side of the sandbox: run as `python -I sandbox_child.py`, configuration on stdin.

Standard library only (it starts once per program, so it must start fast). As root it
1. enters new namespaces (mount, pid, network) where asked,
2. makes every mount read-only in its mount namespace, hides the invoking user's home behind an
   empty tmpfs (binding the Python installation back if it lives there), and mounts the program's
   working directory writable,
3. forks the process that runs the program (pid 1 of the new pid namespace: when it ends, the
   kernel kills everything it started), which sets resource limits, drops to an unprivileged uid/gid
   of its own, forbids gaining privileges, and runs the program,
4. waits, and reports on stderr one JSON line: whether the setup worked and how the program ended.

The program's verdict goes to a separate pipe (`result_fd`): the per-run nonce, written only after
the program (whose last statement is `check(...)`) returned, or "failed: <exception>". stdout and
stderr of the program go to /dev/null.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# Per-mount options as /proc/self/mountinfo spells them; a read-only remount must keep them.
MOUNT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                 "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
SETUP_ERROR = 3  # exit status of this process when the sandbox could not be set up

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None) -> None:
    enc = (lambda s: None if s is None else os.fsencode(s))
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def prctl(option: int, arg: int) -> None:
    _check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


def mount_points() -> list[tuple[str, int]]:
    """(mount point, per-mount flags) of every mount visible here, parents before children."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 for spaces, ...
            flags = 0
            for option in fields[5].split(","):
                flags |= MOUNT_OPTIONS.get(option, 0)
            points.append((point, flags))
    return points


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def setup_filesystem(workdir: str, hide: list[str], keep: list[str]) -> None:
    """Everything read-only; `hide` directories replaced by empty tmpfs with the `keep` paths bound back
    (read-only); `workdir` the one writable place. Runs in a fresh mount namespace."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do here reaches the host's namespace
    # File descriptors first: once a home is hidden, its paths lead into the empty tmpfs.
    binds = [(path, os.open(path, os.O_PATH), False) for path in keep if any(_inside(path, h) for h in hide)]
    binds.append((workdir, os.open(workdir, os.O_PATH | os.O_DIRECTORY), True))
    for point, flags in mount_points():
        if os.path.exists(point):
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
    hidden = [h for h in hide if os.path.isdir(h)]
    for home in hidden:
        mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    for path, fd, writable in sorted(binds, key=lambda b: len(b[0])):
        if any(_inside(path, h) for h in hidden):
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(path, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                open(path, "a").close()
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        extra = 0 if writable else MS_RDONLY
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | extra)
        os.close(fd)
    for home in hidden:  # the tmpfs itself read-only once its mount points exist
        mount(None, home, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def enter_user_namespace(flags: int) -> None:
    """Unprivileged: a user namespace makes the other namespaces possible; map our ids to themselves."""
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(CLONE_NEWUSER | flags), "unshare")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def set_limits(config: dict) -> None:
    cpu = int(config["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (config["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (config["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (config["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if config.get("processes"):  # counts every process of the real uid: only meaningful with our own uid
        resource.setrlimit(resource.RLIMIT_NPROC, (config["processes"],) * 2)


class ProgramTimeout(BaseException):
    """Raised in the program when its time is up."""


def _on_alarm(signum, frame):
    raise ProgramTimeout()


def run_program(config: dict, nonce: str, program: str, result_fd: int) -> None:
    """Runs in the forked child, after its setup: never returns."""
    # A handler, not SIGALRM's default action: pid 1 of a namespace ignores signals it has no handler
    # for. A program that catches this is still stopped by the parent's hard limit.
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, config["timeout"])
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(program, "<program>", "exec"), namespace)
    except BaseException as e:  # SystemExit too: exiting before check() returned is a failure
        try:
            detail = "timed out" if isinstance(e, ProgramTimeout) else f"failed: {type(e).__name__}: {e}"
        except BaseException:
            detail = f"failed: {type(e).__name__}"
        try:
            os.write(result_fd, (detail[:1000] + "\n").encode("utf-8", "replace"))
        finally:
            os._exit(1)
    # check(...) returned: the only way to get here.
    os.write(result_fd, (nonce + "\n").encode())
    os._exit(0)


def child(config: dict, nonce: str, program: str, report_w: int) -> None:
    """pid 1 of the new pid namespace (or a plain child): finish the setup, then run the program."""
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # if the launcher dies, so do we (and our namespace)
        features = config["features"]
        if "pid_namespace" in features and "mount_namespace" in features:
            # A /proc of our own pid namespace: the program sees only its own processes.
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
        set_limits(config)
        if "private_user" in features:
            uid, gid = config["uid"], config["gid"]
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.chdir(config["workdir"])
        os.umask(0o077)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.write(report_w, b"ok\n")
        os.close(report_w)
    except BaseException as e:
        os.write(report_w, f"error: {type(e).__name__}: {e}\n".encode())
        os._exit(SETUP_ERROR)
    run_program(config, nonce, program, config["result_fd"])


def main() -> int:
    config = json.loads(sys.stdin.buffer.read())
    nonce, program = config.pop("nonce"), config.pop("program")
    features = set(config["features"])
    report = {"setup": "error"}
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        flags = ((CLONE_NEWNS if "mount_namespace" in features else 0)
                 | (CLONE_NEWPID if "pid_namespace" in features else 0)
                 | (CLONE_NEWNET if "network_namespace" in features else 0))
        if "user_namespace" in features:
            enter_user_namespace(flags)
        elif flags:
            _check(libc.unshare(flags), "unshare")
        if "mount_namespace" in features:
            setup_filesystem(config["workdir"], config["hide"], config["keep"])
        report_r, report_w = os.pipe()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            try:
                child(config, nonce, program, report_w)
            finally:
                os._exit(SETUP_ERROR)
        os.close(report_w)
        os.close(config["result_fd"])  # only the program's side holds the verdict pipe now
        with os.fdopen(report_r, "rb") as f:
            setup = f.readline(4096).decode(errors="replace").strip()
        _, status = os.waitpid(pid, 0)
        seconds = time.monotonic() - started
        if setup != "ok":
            report["message"] = setup or "the program's process died during its setup"
        else:
            report = {"setup": "ok", "seconds": round(seconds, 4)}
            if os.WIFSIGNALED(status):
                report["signal"] = os.WTERMSIG(status)
            else:
                report["exit"] = os.WEXITSTATUS(status)
    except BaseException as e:
        report["message"] = f"{type(e).__name__}: {e}"
    sys.stderr.write(json.dumps(report) + "\n")
    sys.stderr.flush()
    return 0 if report["setup"] == "ok" else SETUP_ERROR


if __name__ == "__main__":
    sys.exit(main())
