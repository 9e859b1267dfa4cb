"""Run untrusted Python (code the model writes, e.g. for HumanEval) in a throwaway, locked-down subprocess.

Every call starts a fresh interpreter (`python -I -S`: no site-packages, no PYTHON* variables) with a clean
environment, in a new session (so one process group holds everything it starts), with its cwd and HOME a fresh
temporary folder that is removed afterwards. Its stdout and stderr are read incrementally up to a cap; the
wall-clock timeout, an output overflow and the end of the call all kill the whole process group.

Before the interpreter starts, a launcher (this file, run as a script) applies the layers the OS allows; which are
active here is probed once and cached (`isolation()`), and a probed layer that later fails to apply stops the call
(fail closed) instead of running the code with less isolation:
- user: when the caller is root, the child runs as user `nobody`, if that user can run this Python; otherwise it
  runs in a new user namespace, where it has no capability on the host (no CAP_DAC_OVERRIDE, CAP_KILL, ...).
- namespaces: a new network namespace (no interfaces, loopback down: 127.0.0.1 is unreachable) and a new pid
  namespace (it sees no other process to signal, and everything in it dies with its first process).
- Landlock (Linux >= 5.13): files may be written only inside the folder and /dev/null, and read only in the system
  and Python directories; TCP connect/bind is denied (ABI >= 4), and signals and abstract unix sockets cannot
  reach outside (ABI >= 6).
- seccomp: no new processes (fork, vfork and clone without CLONE_THREAD fail with EPERM; threads still work).
  RLIMIT_NPROC is not enforced for root's uid, so this, not the rlimit, is what stops a fork bomb run as root.
- rlimits: CPU seconds, address space, file size, no core files, open files (and processes, without seccomp).
A small prelude also disables `socket.socket` in the child; that is defence in depth, not a security boundary:
code can reach `_socket` directly. The namespaces, Landlock, seccomp, the user and the limits are the boundary.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace

FILE_LIMIT_MB = 10  # RLIMIT_FSIZE: the largest file the code may write
OPEN_FILES = 256  # RLIMIT_NOFILE
PROCESSES = 32  # RLIMIT_NPROC where seccomp is unavailable (it counts every process of the uid)
SETUP_FAILED = 125  # the launcher's exit status when a layer it was asked for could not be applied
READ_CHUNK = 1 << 16
DRAIN_SECONDS = 0.5  # after the process exits, how long to keep reading output still in the pipes
RELAY_SECONDS = 1.0  # how long the launcher may take to kill and reap the pid namespace before it is killed too
PROBE_MARK = "adamba-sandbox-probe-ok"

# The child's Python: the real interpreter behind a virtualenv (-S ignores the venv's packages anyway), so its path
# does not depend on the venv's directory being readable.
PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)

# Run by the child's interpreter before the code (main.py in its folder), as its __main__ module.
PRELUDE = """\
import socket, sys, types
class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError(1, "network access is disabled in the sandbox")
socket.socket = _NoSocket
_main = types.ModuleType("__main__")
_main.__file__, _main.__builtins__ = "main.py", __builtins__
sys.modules["__main__"], sys.argv = _main, ["main.py"]
with open("main.py", encoding="utf-8") as _file:
    _code = compile(_file.read(), "main.py", "exec")
del socket, types, _file, _NoSocket
exec(_code, _main.__dict__)
"""


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "ok", "error" (nonzero exit or exception), "timeout", "killed" (by a limit/signal), "output_limit"
    returncode: int | None  # negative: killed by that signal
    stdout: str
    stderr: str
    duration: float  # seconds, from start to the end of the process
    pid: int | None = None  # the sandbox's process (and process-group) id on the host, for diagnostics

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Isolation:
    """The layers applied to each sandboxed process on this machine (see the module docstring)."""

    user: str  # "nobody", "userns" (a user namespace: no host capabilities) or "caller" (the caller's privileges)
    namespaces: bool  # own network and pid namespaces
    landlock: int  # the Landlock ABI applied; 0: none
    seccomp: bool  # no new processes

    @property
    def filesystem(self) -> bool:
        """Writes outside the sandbox's folder are refused (by Landlock, or by nobody's lack of permissions)."""
        return self.landlock > 0 or self.user == "nobody"

    @property
    def processes(self) -> bool:
        """The number of processes is bounded (seccomp, or RLIMIT_NPROC, which the kernel ignores for root)."""
        return self.seccomp or self.user == "nobody" or os.geteuid() != 0


_isolation: Isolation | None = None
_isolation_lock = threading.Lock()


def isolation() -> Isolation:
    """The isolation active here, probed on first use (one sandboxed run per layer that fails) and cached."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _probe()
        return _isolation


def network_isolated() -> bool:
    """Whether sandboxed code runs in its own network namespace (no route to any host, including this one)."""
    return isolation().namespaces


def run_python(code: str, *, timeout: float = 5.0, memory_mb: int = 512, max_output: int = 64_000,
               stdin: str = "") -> SandboxResult:
    """Run `code` as a Python program in a fresh sandboxed process; stdout/stderr are capped at max_output bytes."""
    return _execute(code, isolation(), timeout=timeout, memory_mb=memory_mb, max_output=max_output, stdin=stdin)


# ---------------------------------------------------------------------------------------------------------------
# The caller's side: probing, starting, reading and killing.


def _probe() -> Isolation:
    """The strongest isolation that works here: start with every layer the OS may have, drop the one that fails."""
    if not sys.platform.startswith("linux"):
        return Isolation(user="caller", namespaces=False, landlock=0, seccomp=False)
    candidate = Isolation(user="nobody" if os.geteuid() == 0 and _nobody() else "userns", namespaces=True,
                          landlock=_landlock_abi(), seccomp=os.uname().machine in _SECCOMP_ARCHES)
    for _ in range(8):
        result = _execute(f"print({PROBE_MARK!r})", candidate, timeout=20.0, memory_mb=512, max_output=4096, stdin="")
        if result.ok and result.stdout.strip() == PROBE_MARK:
            return candidate
        weaker = _without_failed_layer(candidate, result.stderr)
        if weaker == candidate:
            break
        candidate = weaker
    return Isolation(user="caller", namespaces=False, landlock=0, seccomp=False)


def _without_failed_layer(candidate: Isolation, stderr: str) -> Isolation:
    """`candidate` less the layer the launcher reported failing (or, if it named none, the most fragile one)."""
    step = stderr.partition("adamba-sandbox: setup failed at ")[2].partition(":")[0]
    if step == "user":
        return replace(candidate, user="userns")
    if step == "userns":
        return replace(candidate, user="caller")
    if step == "namespaces":
        return replace(candidate, namespaces=False)
    if step == "landlock" or (not step and candidate.landlock):  # e.g. Python could not read a file it needs
        return replace(candidate, landlock=0)
    if step in ("seccomp", "") and candidate.seccomp:
        return replace(candidate, seccomp=False)
    return candidate


def _nobody() -> tuple[int, int] | None:
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _landlock_abi() -> int:
    """The Landlock ABI version the kernel offers (0: none), capped at the newest this file knows (6)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        abi = libc.syscall(ctypes.c_long(_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (OSError, AttributeError):
        return 0
    return max(0, min(int(abi), 6))


def _execute(code: str, iso: Isolation, *, timeout: float, memory_mb: int, max_output: int,
             stdin: str) -> SandboxResult:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="adamba-sandbox-", ignore_cleanup_errors=True) as folder, \
            tempfile.TemporaryFile() as stdin_file:
        _prepare(folder, code, iso)
        stdin_file.write(stdin.encode("utf-8"))
        stdin_file.seek(0)
        config = _launcher_config(folder, iso, timeout, memory_mb)
        proc = subprocess.Popen([PYTHON, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(config)],
                                stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=folder,
                                env=_clean_env(folder), start_new_session=True, close_fds=True)
        try:
            stdout, stderr, reason = _collect(proc, start + timeout, max_output)
        finally:
            _stop(proc.pid, relayed=iso.namespaces)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    return SandboxResult(status=_status(reason, proc.returncode), returncode=proc.returncode,
                         stdout=stdout.decode("utf-8", errors="replace"),
                         stderr=stderr.decode("utf-8", errors="replace"), duration=time.monotonic() - start,
                         pid=proc.pid)


def _prepare(folder: str, code: str, iso: Isolation) -> None:
    with open(os.path.join(folder, "main.py"), "w", encoding="utf-8") as file:
        file.write(code)
    if iso.user == "nobody":  # its folder is the one place nobody may write
        uid, gid = _nobody()
        os.chown(folder, uid, gid)


def _clean_env(folder: str) -> dict[str, str]:
    """Nothing of the caller's environment; TMPDIR too points at the folder, the one place the code may write."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": folder, "TMPDIR": folder}


def _launcher_config(folder: str, iso: Isolation, timeout: float, memory_mb: int) -> dict:
    prefixes = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(PYTHON))}
    return {
        "python": PYTHON, "folder": folder, "timeout": timeout, "memory_mb": memory_mb,
        "user": list(_nobody()) if iso.user == "nobody" else None, "userns": iso.user == "userns",
        "namespaces": iso.namespaces, "landlock": iso.landlock, "seccomp": iso.seccomp,
        # Readable: the system's programs and libraries, this Python, /proc (Landlock keeps other processes' private
        # entries from it), and a few files of /etc and /dev; not /root, /home, /tmp, /work, /dev's disks, ...
        "read_dirs": sorted(prefixes) + ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/proc",
                                         "/sys/devices/system/cpu"],
        "read_files": ["/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/passwd", "/etc/group",
                       "/etc/nsswitch.conf", "/etc/hosts", "/etc/mime.types", "/etc/ssl/openssl.cnf",
                       "/dev/urandom", "/dev/random", "/dev/zero"],
        "write_files": ["/dev/null"],
    }


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr until both close (or the process ends); the reason it was cut short, if it was."""
    out, err = proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out: bytearray(), err: bytearray()}
    poller = select.poll()
    for fd in buffers:
        poller.register(fd, select.POLLIN)
    live, exited_at, reason = set(buffers), None, None
    while live and reason is None:
        now = time.monotonic()
        if exited_at is None and _has_exited(proc.pid):
            exited_at = now
            _kill_group(proc.pid)  # whatever it left behind would hold the pipes open
        if exited_at is None and now >= deadline:
            reason = "timeout"
            break
        if exited_at is not None and now >= exited_at + DRAIN_SECONDS:
            break
        for fd, _ in poller.poll(50 if exited_at is not None else max(1, min(50, (deadline - now) * 1000))):
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                poller.unregister(fd)
                live.discard(fd)
            buffers[fd] += chunk
            if len(buffers[fd]) > cap:
                del buffers[fd][cap:]
                reason = "output_limit"
                break
    if reason is None and not _wait_exit(proc.pid, deadline):
        reason = "timeout"
    return bytes(buffers[out]), bytes(buffers[err]), reason


def _has_exited(pid: int) -> bool:
    """Whether the process has ended, without reaping it (WNOWAIT), so its id stays its own until we kill its group."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _wait_exit(pid: int, deadline: float) -> bool:
    while not _has_exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _stop(pid: int, relayed: bool) -> None:
    """Kill everything the sandbox started. With a pid namespace, first ask the relaying launcher to kill and reap
    the namespace's first process (with it, the kernel kills the rest of the namespace): SIGKILLed together, the
    launcher would die first and leave that process a zombie for the host's init to reap, if it ever does."""
    if relayed and not _has_exited(pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _wait_exit(pid, time.monotonic() + RELAY_SECONDS)
    _kill_group(pid)  # before reaping the leader: while unreaped, it keeps its group id from being reused


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _status(reason: str | None, returncode: int | None) -> str:
    if reason is not None:
        return reason
    if returncode == 0:
        return "ok"
    if returncode is not None and returncode < 0:
        return "killed"
    return "error"


# ---------------------------------------------------------------------------------------------------------------
# The launcher: run as `python -I -S sandbox.py CONFIG` in the new session, it applies the layers and then execs the
# child's interpreter. It imports only the standard library, and nothing of the caller's code runs in it.

_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET, _CLONE_THREAD = 0x10000000, 0x20000000, 0x40000000, 0x00010000
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 1, 38, 22, 2
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446  # the same on every arch
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1  # execute .. make_sym: every right of ABI 1
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
# seccomp's view of the syscalls that create processes: (audit arch, {name: number}, has the x32 ABI)
_SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}, True),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435}, False),
}


def _launch(config: dict) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # also for the relaying parent, should it die by a signal
    if config["userns"]:
        _step("userns", _unshare, _CLONE_NEWUSER)  # first, so the namespaces below belong to it
    if config["namespaces"]:
        _step("namespaces", _unshare, _CLONE_NEWNET | _CLONE_NEWPID)
        child = os.fork()  # the first process of the new pid namespace; everything in it dies with it
        if child:
            _relay(child)
    if config["user"]:
        _step("user", _become, *config["user"], config["python"])
    _step("pdeathsig", _prctl, _PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
    _step("limits", _set_limits, config)
    _step("no_new_privs", _prctl, _PR_SET_NO_NEW_PRIVS, 1)  # required by Landlock and seccomp without privileges
    if config["landlock"]:
        _step("landlock", _landlock, config)
    if config["seccomp"]:
        _step("seccomp", _seccomp)
    _step("exec", os.execv, config["python"], [config["python"], "-I", "-S", "-B", "-u", "-c", PRELUDE])


def _step(name: str, function, *args) -> None:
    """Apply one layer, or stop with SETUP_FAILED naming it: never run the code with less than was asked."""
    try:
        function(*args)
    except (OSError, ValueError) as error:
        os.write(2, f"adamba-sandbox: setup failed at {name}: {error}\n".encode())
        os._exit(SETUP_FAILED)


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _checked_call(result: int) -> int:
    if result == -1:
        import ctypes

        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def _unshare(flags: int) -> None:
    _checked_call(_libc().unshare(flags))


def _prctl(option: int, value: int) -> None:
    import ctypes

    _checked_call(_libc().prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                                ctypes.c_ulong(0)))


def _relay(child: int) -> None:
    """Outside the pid namespace: wait for its first process and end the same way, so the caller sees its status.
    SIGTERM (from the caller, see _stop) kills that process, so that this one reaps it before ending."""

    def kill_child(*_) -> None:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, kill_child)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        os._exit(128 + number)  # a signal whose default is not to terminate
    os._exit(os.waitstatus_to_exitcode(status))


def _become(uid: int, gid: int, python: str) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if not (os.access(python, os.X_OK) and os.access(os.__file__, os.R_OK)):  # e.g. Python lives under /root
        raise PermissionError(13, f"uid {uid} cannot run {python}")


def _set_limits(config: dict) -> None:
    import resource

    cpu = math.ceil(config["timeout"]) + 1  # the wall clock normally fires first; the hard limit is a SIGKILL
    memory = config["memory_mb"] << 20
    limits = {resource.RLIMIT_CPU: (cpu, cpu + 1), resource.RLIMIT_AS: (memory, memory),
              resource.RLIMIT_FSIZE: (FILE_LIMIT_MB << 20,) * 2, resource.RLIMIT_NOFILE: (OPEN_FILES, OPEN_FILES)}
    if not config["seccomp"]:  # with seccomp no process can be made; the rlimit would only cap threads
        limits[resource.RLIMIT_NPROC] = (PROCESSES, PROCESSES)
    for kind, (soft, hard) in limits.items():
        current = resource.getrlimit(kind)[1]
        hard = hard if current == resource.RLIM_INFINITY else min(hard, current)  # a limit can't be raised
        resource.setrlimit(kind, (min(soft, hard), hard))


def _landlock(config: dict) -> None:
    """Writes only inside the folder and /dev/null; reads only of the listed places; per ABI, no TCP, no signals."""
    import ctypes

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                    ("scoped", ctypes.c_uint64)]

    abi = config["landlock"]
    fs = _FS_ABI1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    attr = RulesetAttr(fs, _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
                       _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # the struct as the kernel of that ABI knows it
    libc = _libc()
    ruleset = _checked_call(libc.syscall(ctypes.c_long(_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                                         ctypes.c_size_t(size), ctypes.c_uint32(0)))
    read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    write_file = _FS_READ_FILE | _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)
    try:
        _landlock_allow(libc, ruleset, config["folder"], fs)
        for path in config["read_dirs"]:
            _landlock_allow(libc, ruleset, path, read)
        for path in config["read_files"]:
            _landlock_allow(libc, ruleset, path, _FS_EXECUTE | _FS_READ_FILE)
        for path in config["write_files"]:
            _landlock_allow(libc, ruleset, path, write_file)
        _checked_call(libc.syscall(ctypes.c_long(_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)))
    finally:
        os.close(ruleset)


def _landlock_allow(libc, ruleset: int, path: str, access: int) -> None:
    """Allow `access` beneath `path` (a missing or unreachable path is skipped: there is nothing to allow)."""
    import ctypes

    class PathBeneathAttr(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        return
    try:
        attr = PathBeneathAttr(access, fd)
        _checked_call(libc.syscall(ctypes.c_long(_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                                   ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(attr), ctypes.c_uint32(0)))
    finally:
        os.close(fd)


def _seccomp() -> None:
    """A filter making fork/vfork/clone (without CLONE_THREAD) fail with EPERM, and clone3 with ENOSYS (glibc then
    falls back to clone, so threads still start); a syscall of another ABI (i386, x32) is refused or kills."""
    import ctypes

    program = _seccomp_program(*_SECCOMP_ARCHES[os.uname().machine])

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(program))(*[SockFilter(*instruction) for instruction in program])
    prog = SockFprog(len(program), filters)
    _checked_call(_libc().prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(prog),
                                ctypes.c_ulong(0), ctypes.c_ulong(0)))


def _seccomp_program(audit_arch: int, numbers: dict[str, int], x32: bool) -> list[tuple[int, int, int, int]]:
    """The BPF instructions (code, jt, jf, k), assembled from a list whose jumps name labels."""
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    errno, allow, kill = 0x00050000, 0x7FFF0000, 0x80000000  # SECCOMP_RET_ERRNO, _ALLOW, _KILL_PROCESS
    code = [(ld, 4, None, None), (jeq, audit_arch, None, "kill"), (ld, 0, None, None)]  # seccomp_data.arch, .nr
    if x32:
        code.append((jge, 0x40000000, "deny", None))  # x32 syscall numbers carry this bit
    code += [(jeq, numbers[name], "deny", None) for name in ("fork", "vfork") if name in numbers]
    code += [(jeq, numbers["clone3"], "nosys", None), (jeq, numbers["clone"], None, "allow"),
             (ld, 16, None, None), (jset, _CLONE_THREAD, "allow", "deny")]  # clone's flags: low half of args[0]
    labels = {"allow": (ret, allow), "deny": (ret, errno | 1), "nosys": (ret, errno | 38), "kill": (ret, kill)}
    where = {label: len(code) + i for i, label in enumerate(labels)}
    program = []
    for i, (op, k, jt, jf) in enumerate(code):
        program.append((op, where[jt] - i - 1 if jt else 0, where[jf] - i - 1 if jf else 0, k))
    program += [(op, 0, 0, k) for op, k in labels.values()]
    return program


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
