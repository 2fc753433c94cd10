"""The sandbox launcher: the trusted process tree between the caller and untrusted code.

Run as ``python -I -S -B _sandbox_launch.py [SCRATCH_DIR]`` with one marshal'd job on
stdin (the argument only names the run in ``ps``). It uses the standard library only,
so it runs without the package or its virtual environment.
Report lines (JSON) go to its stdout; the program's own stdout and stderr go to its
stderr. `posttrain.rewards.sandbox` builds the job and reads the results.

Process tree with ``isolation == "namespaces"``::

    A  launcher in the host namespaces, child subreaper. Writes B's uid/gid maps,
       kills B and C on SIGTERM or when its alarm fires, reaps every descendant.
    '- B  unshare(user | mount | pid | net | ipc | uts), waits for its id maps.
       '- C  pid 1 of the new pid namespace: builds the new root (read-only binds of
          |  the interpreter, fresh tmpfs for /box and /tmp, /proc, a few /dev nodes),
          |  pivot_root, then only reaps. When C exits the kernel kills the namespace.
          '- D  new session, rlimits, no capabilities, an unprivileged uid: the harness.

With ``isolation == "none"`` (the caller allowed unsafe runs) A forks D directly: rlimits,
a new session, a cleared environment and the job's scratch directory, nothing more.
"""

from __future__ import annotations

import contextlib
import ctypes
import marshal
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
KEEP_FLAGS = 8 | 1024 | 2048 | 4096  # noexec and atime flags: locked in a user namespace
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 4, 24, 28
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 38, 47, 4
SECBIT_NOROOT_AND_LOCK = 0b11  # execve never grants capabilities to uid 0, and that is locked
SYSCALLS = {"x86_64": (155, 126), "aarch64": (41, 91), "riscv64": (41, 91)}  # (pivot_root, capset)
SETUP_EXIT = 121
DEV_NODES = ("null", "zero", "full", "random", "urandom")
NEW_ROOT = "/tmp"  # mounted over only inside the new mount namespace; any user can reach it

_libc = ctypes.CDLL(None, use_errno=True)
_HARNESS: dict = {}  # the harness module's namespace, loaded by `main`


def _check(ret: int, what: str) -> int:
    """Raise OSError with errno when a libc call returned -1."""
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_b(src), _b(dst), _b(fstype), ctypes.c_ulong(flags), _b(data)), f"mount {dst}")


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> int:
    return _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), 0, 0)


def _setup_failed(exc: BaseException, fd: int = 1) -> None:
    """Report a failure of the sandbox itself (not of the program) and exit."""
    with contextlib.suppress(OSError, KeyError):
        os.write(
            fd, _HARNESS["json_line"]({"event": "setup_error", "detail": f"{type(exc).__name__}: {exc}"})
        )
    os._exit(SETUP_EXIT)


def _exit_code(status: int | None) -> int:
    """A wait status as a shell-style exit code (128 + signal for a killed process)."""
    if status is None:
        return SETUP_EXIT
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _reap_all(first: int) -> int:
    """Wait for every child (orphans come to us as subreaper); the exit code of ``first``."""
    status = None
    while True:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            return _exit_code(status)
        if pid == first:
            status = st


def _kill_on_signal(pids: list[int]) -> None:
    """On SIGTERM or SIGALRM, SIGKILL ``pids``."""

    def kill(*_: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    for sig in (signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, kill)


def _write_id_maps(pid: int, job: dict) -> None:
    """Map B's user namespace ids: inner 0 (setup) and inner 1000 (the program) to unused host ids.

    Without privilege (a non-root caller) only the caller's own id can be mapped, to inner 0.
    """
    base = job["host_id_base"]
    if os.geteuid() == 0:
        uid_map = gid_map = f"0 {base} 1\n{job['inner_uid']} {base + job['inner_uid']} 1\n"
    else:
        uid_map, gid_map = f"0 {os.geteuid()} 1\n", f"0 {os.getegid()} 1\n"
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(gid_map)


def run_namespaced(job: dict, harness: dict) -> int:
    """Process A: fork B, map its ids, hand it the go signal, reap the tree."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    me = os.getpid()
    b = os.fork()
    if b == 0:
        os.close(go_w)
        os.close(ready_r)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != me:
            os._exit(SETUP_EXIT)
        _process_b(job, harness, go_r, ready_w)
    os.close(go_r)
    os.close(ready_w)
    victims = [b]
    _kill_on_signal(victims)
    signal.alarm(int(job["hard_timeout_s"]))
    try:
        if os.read(ready_r, 1) == b"u":
            _write_id_maps(b, job)
            os.write(go_w, b"g")
            line = os.read(ready_r, 32).decode().strip()  # B sends C's host pid
            if line.isdigit():
                victims.append(int(line))
    except OSError as exc:
        os.kill(b, signal.SIGKILL)
        _reap_all(b)
        _setup_failed(exc)
    return _reap_all(b)


def _process_b(job: dict, harness: dict, go_r: int, ready_w: int) -> None:
    """Process B: enter the new namespaces, wait for the id maps, fork C (pid 1)."""
    try:
        flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
        _check(_libc.unshare(flags), "unshare")
    except OSError as exc:
        _setup_failed(exc)
    os.write(ready_w, b"u")
    if os.read(go_r, 1) != b"g":
        os._exit(SETUP_EXIT)
    os.close(go_r)
    try:
        # Opened now, with the host credentials (to look up paths such as /root/...), and in
        # the new mount namespace (a bind source must belong to it).
        job["ro_fds"] = [os.open(path, os.O_PATH) for path in job["ro_paths"]]
        # The maps do not change our credentials: become the namespace's (mapped) root.
        if os.geteuid() != 0 or os.getegid() != 0:
            with open("/proc/self/setgroups") as f:
                if f.read().strip() == "allow":
                    os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
    except OSError as exc:
        _setup_failed(exc)
    c = os.fork()
    if c == 0:
        os.close(ready_w)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _process_c(job, harness)
    os.write(ready_w, f"{c}\n".encode())
    os.close(ready_w)
    _, status = os.waitpid(c, 0)
    os._exit(_exit_code(status))


def _process_c(job: dict, harness: dict) -> None:
    """Process C, pid 1: build and enter the new root, fork D, reap until D exits."""
    try:
        # pid 1 ignores signals it has no handler for; block the rest so D cannot stop it.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        uid = job["inner_uid"] if _mapped(job["inner_uid"]) else 0
        build_root(NEW_ROOT, job, uid)
        enter_root(NEW_ROOT)
        write_files("/box", job["files"], uid)
        for fd in job["ro_fds"]:
            os.close(fd)
    except OSError as exc:
        _setup_failed(exc)
    d = os.fork()
    if d == 0:
        _process_d(job, harness, "/box", uid)
    while True:
        pid, status = os.wait()
        if pid == d:
            os._exit(_exit_code(status))


def _mapped(uid: int) -> bool:
    with open("/proc/self/uid_map") as f:
        return any(line.split()[0] == str(uid) for line in f if line.strip())


def build_root(root: str, job: dict, owner: int) -> None:
    """Mount a tmpfs at ``root`` and fill it: read-only binds, symlinks, /dev, /proc, /box, /tmp.

    The binds' sources are O_PATH descriptors opened before this tmpfs hid anything.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    for path, fd in zip(job["ro_paths"], job["ro_fds"], strict=True):
        bind_readonly(f"/proc/self/fd/{fd}", root + path)
    for link, target in job["symlinks"]:
        os.makedirs(os.path.dirname(root + link), exist_ok=True)
        os.symlink(target, root + link)
    os.makedirs(root + "/dev", exist_ok=True)
    for node in DEV_NODES:
        open(f"{root}/dev/{node}", "w").close()
        _mount(f"/dev/{node}", f"{root}/dev/{node}", None, MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
    ):
        os.symlink(target, f"{root}/dev/{name}")
    os.symlink("/proc/self/fd/2", f"{root}/dev/stderr")
    size = f"size={job['disk_mb']}m"
    for path, opts in (
        ("/box", f"mode=0700,uid={owner},gid={owner}"),
        ("/tmp", "mode=1777"),
        ("/dev/shm", "mode=1777"),
    ):
        os.makedirs(root + path, exist_ok=True)
        _mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, f"{size},{opts}")
    os.makedirs(root + "/proc", exist_ok=True)
    with contextlib.suppress(OSError):  # refused where the host masks parts of /proc: no /proc then
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def bind_readonly(src: str, dst: str) -> None:
    """Bind ``src`` at ``dst`` recursively, then remount it and every submount read-only, nosuid, nodev.

    ``src`` is a ``/proc/self/fd`` link to an O_PATH descriptor that A opened as the host
    user: the namespace's root may not be allowed to look the path up (e.g. under /root).
    """
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    _mount(src, dst, None, MS_BIND | MS_REC)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in [dst] + [p for p in points if p.startswith(dst + "/")]:
        keep = os.statvfs(point).f_flag & KEEP_FLAGS
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | keep
        _mount(None, point, None, flags)


def enter_root(root: str) -> None:
    """pivot_root into ``root``, detach the old root, make the new one read-only."""
    pivot, _ = SYSCALLS[os.uname().machine]
    os.chdir(root)
    _check(_libc.syscall(pivot, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def write_files(box: str, files: dict[str, str], owner: int) -> None:
    """Write the job's files into ``box`` owned by ``owner``."""
    for name, text in files.items():
        path = os.path.join(box, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chown(path, owner, owner)


def drop_privileges(uid: int) -> None:
    """Empty the capability bounding set, lock out root's execve privileges, switch uid, no_new_privs."""
    for cap in range(64):
        if _prctl(PR_CAPBSET_DROP, cap) != 0:
            break  # EINVAL past the last capability (or EPERM without CAP_SETPCAP)
    _prctl(PR_SET_SECUREBITS, SECBIT_NOROOT_AND_LOCK)
    if uid != os.getuid():
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if os.uname().machine in SYSCALLS:  # capset(v3, all sets empty)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        _check(_libc.syscall(SYSCALLS[os.uname().machine][1], header, (ctypes.c_uint32 * 6)()), "capset")
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")


def set_limits(job: dict) -> None:
    """The per-process resource limits (RLIMIT_*) of the program and anything it starts."""
    mb = 1 << 20
    cpu = int(job["cpu_s"])
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (job["mem_mb"] * mb,) * 2,
        resource.RLIMIT_FSIZE: (job["file_mb"] * mb,) * 2,
        resource.RLIMIT_NOFILE: (job["max_open_files"],) * 2,
        resource.RLIMIT_NPROC: (job["max_procs"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_MEMLOCK: (0, 0),
    }
    for kind, value in limits.items():
        resource.setrlimit(kind, value)


def _process_d(job: dict, harness: dict, box: str, uid: int) -> None:
    """Process D: new session, fds (0 null, 1/2 output, 3 report), limits, privileges, harness."""
    code = SETUP_EXIT
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setsid()
        os.dup2(1, 3, inheritable=False)
        os.dup2(2, 1)
        os.closerange(4, 1 << 16)
        os.chdir(box)
        os.environ.clear()
        os.environ.update(job["env"])
        set_limits(job)
        if job["isolation"] == "namespaces":
            drop_privileges(uid)
        elif job["unsafe_uid"] is not None:
            drop_privileges(job["unsafe_uid"])
        _prctl(PR_SET_DUMPABLE, 0)  # same-uid children cannot read the harness's memory
        code = harness["run"](job, 3)
    except BaseException as exc:  # the last resort must report anything
        _setup_failed(exc, fd=3)
    os._exit(code)


def _kill_descendants(group: int) -> None:
    """SIGKILL process group ``group`` and every current child of this (subreaper) process."""
    pids = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    for kill, target in [(os.killpg, group)] + [(os.kill, pid) for pid in pids]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(target, signal.SIGKILL)


def run_unsafe(job: dict, harness: dict) -> int:
    """Process A without namespaces: fork D in the job's scratch directory; once D is done
    (or on SIGTERM/alarm) kill D's group and any orphan that came to us, and reap."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    box = os.path.join(job["workdir"], "box")
    owner = os.getuid() if job["unsafe_uid"] is None else job["unsafe_uid"]
    os.mkdir(box, 0o700)
    os.chown(box, owner, owner)
    write_files(box, job["files"], owner)
    d = os.fork()
    if d == 0:
        _process_d(job, harness, box, job["unsafe_uid"])
    for sig in (signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, lambda *_: _kill_descendants(d))
    signal.alarm(int(job["hard_timeout_s"]))
    status = None
    while True:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            return _exit_code(status)
        if pid == d:
            status = st
        if status is not None:
            _kill_descendants(d)


def main() -> None:
    """Read the job (marshal: trusted, from the same interpreter binary), load the harness, run the tree."""
    job = marshal.loads(sys.stdin.buffer.read())
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    harness = _HARNESS
    harness["__name__"] = "_sandbox_harness"
    exec(job["harness_code"], harness)  # compiled by the caller: saves start-up time
    if job["isolation"] == "namespaces":
        os._exit(run_namespaced(job, harness))
    os._exit(run_unsafe(job, harness))


if __name__ == "__main__":
    main()
