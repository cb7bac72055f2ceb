"""The child side of the sandbox: run as `python -I sandbox_child.py`, configuration on stdin.

Standard library only (it starts once per program, so it must start fast). It
1. becomes a child subreaper (whatever the program starts stays in this process's tree, so the
   evaluator finds and stops exactly the program's processes), enters new namespaces (mount, pid,
   network, IPC; without root inside a user namespace) where asked, caps System V IPC in its IPC
   namespace, and forks the program's process (pid 1 of the new pid namespace: when it ends, the
   kernel kills everything it started);
2. that process builds a new root in the mount namespace holding only the system directories and
   the Python installation (read-only), a few device nodes, a private /dev/shm, a proc of its own
   and the program's working directory (writable), and pivots into it: host sockets, /tmp, /run and
   homes do not exist there; it joins the program's cgroup where there is one, sets resource limits,
   drops (as root) to an unprivileged uid/gid of its own, drops every capability, forbids gaining
   privileges, and runs the program;
3. the launcher reports on stderr one JSON line when the program starts and one when it ended (or
   why the setup failed), then waits for the evaluator to close its stdin: until then the program's
   processes cannot leave its tree.

The program's verdict goes to a separate pipe (`result_fd`): the per-run nonce, written only after
the program (whose last statement is `check(...)`) returned, or "failed: <exception>". stdout and
stderr of the program go to /dev/null.
"""

import ctypes
import errno
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 24, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
# What the new root holds besides the Python installation: read-only, and none of the places where
# services put their sockets (/run, /tmp, /var) or users their files.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEVICES = ("null", "zero", "full", "random", "urandom")
# Per-mount options as /proc/self/mountinfo spells them; a read-only remount must keep them.
MOUNT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                 "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
MSGQUEUE_BYTES = 256 << 10  # POSIX message queues, all of them together (RLIMIT_MSGQUEUE)
SETUP_ERROR = 3  # exit status of this process when the sandbox could not be set up

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


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


def setup_filesystem(root: str, workdir: str, keep: list[str], shm_bytes: int, own_pids: bool) -> None:
    """Pivot into a new root (a tmpfs mounted on `root`) holding only SYSTEM_PATHS and the `keep` paths
    read-only, DEVICES, a private /dev/shm and `workdir`, the one writable place. Runs in a fresh mount
    namespace; `root` and `workdir` are directories of the evaluator (workdir may lie inside root)."""
    import platform

    pivot_root = SYS_PIVOT_ROOT.get(platform.machine())
    if pivot_root is None:
        raise OSError(f"pivot_root: no system call number known for {platform.machine()}")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do here reaches the host's namespace
    work_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)  # before the tmpfs on root may hide it
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    paths = sorted({p for p in (*SYSTEM_PATHS, *keep) if os.path.lexists(p)})
    whole = [p for p in paths if not os.path.islink(p)]
    for path in paths:
        if any(q != path and _inside(path, q) for q in whole):
            continue  # bound with a directory above it
        target = root + path
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if os.path.islink(path):  # /bin -> usr/bin and the like
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.mkdir(target, 0o755)
            mount(path, target, None, MS_BIND | MS_REC)
    dev = root + "/dev"
    os.mkdir(dev, 0o755)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            open(f"{dev}/{name}", "w").close()
            mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm")
    mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={shm_bytes},mode=1777")
    os.mkdir(root + "/proc", 0o555)
    if own_pids:
        # A proc of our own pid namespace (we are its first process): it shows only the program's
        # processes. Mounted before the pivot: in a user namespace the kernel allows a new proc only
        # where one is already fully visible.
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    else:
        mount("/proc", root + "/proc", None, MS_BIND | MS_REC)
    target = root + workdir
    os.makedirs(target, mode=0o755, exist_ok=True)
    mount(f"/proc/self/fd/{work_fd}", target, None, MS_BIND)
    os.close(work_fd)
    writable = {target, f"{dev}/shm"}
    for point, flags in mount_points():
        # Every mount of the new root read-only but those two, each keeping its own flags (in a user
        # namespace, those inherited from the host's mounts are locked).
        if _inside(point, root) and not (own_pids and point == root + "/proc"):
            extra = MS_NOSUID | MS_NODEV if point in writable else MS_RDONLY
            mount(None, point, None, MS_REMOUNT | MS_BIND | flags | extra)
    os.chdir(root)
    _check(libc.syscall(pivot_root, b".", b"."), "pivot_root")  # the old root ends up stacked on "."
    _check(libc.umount2(b".", MNT_DETACH), "umount the old root")
    os.chdir("/")


def drop_bounding_set() -> None:
    """No capability can be gained again (needs CAP_SETPCAP: before giving up root)."""
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) == 0:
        cap += 1
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: past the last capability this kernel has
        _check(-1, f"prctl PR_CAPBSET_DROP {cap}")


def clear_capabilities() -> None:
    """No capability left. In a user namespace the program would otherwise hold them all there (it is
    not exec'd), enough to undo the read-only mounts."""
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (two words each): all empty
    _check(libc.capset(header, data), "capset")


def limit_ipc(memory_bytes: int) -> None:
    """System V shared memory and message queues of this (new) IPC namespace: at most the memory limit."""
    page = os.sysconf("SC_PAGE_SIZE")
    for name, value in (("shmmax", memory_bytes), ("shmall", memory_bytes // page), ("shmmni", 64), ("msgmni", 16)):
        with open(f"/proc/sys/kernel/{name}", "w") as f:
            f.write(str(value))


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
    hard = resource.getrlimit(resource.RLIMIT_MSGQUEUE)[1]
    queues = MSGQUEUE_BYTES if hard == resource.RLIM_INFINITY else min(MSGQUEUE_BYTES, hard)
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (queues, queues))
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
        if "cgroup_fd" in config:  # the program and all it starts, not the launcher
            os.write(config["cgroup_fd"], b"0")
            os.close(config["cgroup_fd"])
        if "mount_namespace" in features:
            setup_filesystem(config["root"], config["workdir"], config["keep"], config["shm_bytes"],
                             own_pids="pid_namespace" in features)
        set_limits(config)
        drop_bounding_set()
        if "private_user" in features:
            uid, gid = config["uid"], config["gid"]
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        clear_capabilities()
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


def report(message: dict) -> None:
    sys.stderr.write(json.dumps(message) + "\n")
    sys.stderr.flush()


def main() -> int:
    config = json.loads(sys.stdin.buffer.readline())
    nonce, program = config.pop("nonce"), config.pop("program")
    features = set(config["features"])
    result = {"setup": "error"}
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        if config.get("cgroup"):  # opened now: the new root has no /sys
            config["cgroup_fd"] = os.open(os.path.join(config["cgroup"], "cgroup.procs"), os.O_WRONLY)
        flags = ((CLONE_NEWNS if "mount_namespace" in features else 0)
                 | (CLONE_NEWPID if "pid_namespace" in features else 0)
                 | (CLONE_NEWNET if "network_namespace" in features else 0)
                 | (CLONE_NEWIPC if "ipc_namespace" in features else 0))
        if "user_namespace" in features:
            enter_user_namespace(flags)
        elif flags:
            _check(libc.unshare(flags), "unshare")
        if "ipc_namespace" in features and "user_namespace" not in features:
            limit_ipc(config["memory_bytes"])
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            try:
                child(config, nonce, program, report_w)
            finally:
                os._exit(SETUP_ERROR)
        os.close(report_w)
        os.close(config["result_fd"])  # only the program's side holds the verdict pipe now
        if "cgroup_fd" in config:
            os.close(config["cgroup_fd"])
        with os.fdopen(report_r, "rb") as f:
            setup = f.readline(4096).decode(errors="replace").strip()
        started = time.monotonic()
        if setup == "ok":
            report({"started": True})
        _, status = os.waitpid(pid, 0)
        seconds = time.monotonic() - started
        if setup != "ok":
            result["message"] = setup or "the program's process died during its setup"
        else:
            result = {"setup": "ok", "seconds": round(seconds, 4)}
            if os.WIFSIGNALED(status):
                result["signal"] = os.WTERMSIG(status)
            else:
                result["exit"] = os.WEXITSTATUS(status)
    except BaseException as e:
        result["message"] = f"{type(e).__name__}: {e}"
    report(result)
    # Stay until the evaluator has stopped what the program left behind (it closes our stdin then):
    # as a subreaper we keep those processes in our tree, where it finds them.
    sys.stdin.buffer.read()
    return 0 if result["setup"] == "ok" else SETUP_ERROR


if __name__ == "__main__":
    sys.exit(main())
