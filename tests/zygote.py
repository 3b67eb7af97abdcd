"""Test processes forked from a server that has already imported torch.

Every `bifocal` process a test starts pays ~2 s of CPU to import torch and `torch._dynamo` (which
`torch.optim` imports when an optimizer is built) before it does anything of its own; the suite
starts hundreds. Here a server process (one per pytest worker) imports those once (PRELOAD), freezes
them out of the garbage collector's walks (`gc.freeze`) and forks each test process from itself.
(DeepSpeed's own tests go further: they keep a pool of processes, and its process group, from one
test to the next: `reuse_dist_env` in tests/unit/common.py.)

What a forked process does is what a fresh one does: its own pid, environment, working directory,
stdin (/dev/null), stdout/stderr files and `sys.argv`; bifocal, DeepSpeed and everything else are
imported fresh in it, so their import-time output and settings are its own; it runs `python -m
MODULE` or `python SCRIPT` through runpy and ends with a normal interpreter exit (atexit handlers,
finalisation: where a badly torn-down process group aborts). What it does not repeat is the import
of PRELOAD (with numpy, which torch imports), which prints nothing and reads no setting a test
changes (matplotlib reads MPLBACKEND, MPLCONFIGDIR and a matplotlibrc: no test sets them); torch's
OpenMP runtime reads OMP_NUM_THREADS as it loads, so every forked process has the server's 1, the
value cli_env gives every test process anyway.

Server protocol (JSON lines): the client writes {"argv", "cwd", "env", "stdout", "stderr"}; the
server answers {"pid": N} once forked and {"exit": N, "status": S} when the process ends (the server
is its parent and reaps it). tests/test_parallel.py checks the semantics above.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Silent at import. TensorBoard's writer and pyplot: every training run's rank 0 writes with both.
PRELOAD = ("torch", "torch._dynamo", "torch.utils.tensorboard", "matplotlib.pyplot")


class ZygoteProcess:
    """A forked test process: the part of `subprocess.Popen`'s interface the tests use."""

    def __init__(self, zygote: "Zygote", pid: int, args: list[str]):
        self.zygote, self.pid, self.args, self.returncode = zygote, pid, args, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.zygote.pump(0)
            self.returncode = self.zygote.exits.pop(self.pid, None)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.zygote.pump(0.5 if left is None else min(left, 0.5))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """Client: starts the server on first use; `spawn` forks one process from it."""

    def __init__(self, env: Callable[[], dict[str, str]]) -> None:
        self.env = env  # the server's environment (torch's import reads it)
        self.proc: subprocess.Popen | None = None
        self.exits: dict[int, int] = {}
        self.buffer = b""
        self.pending: list[dict] = []

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=self.env(), cwd="/")
        ready = self.message(timeout=120)
        assert ready == {"ready": True}, ready

    def spawn(self, argv: list[str], cwd: str | Path, env: dict[str, str], stdout: str | Path,
              stderr: str | Path | None = None) -> ZygoteProcess:
        """Fork `python ARGV` (ARGV: ["-m", MODULE, ...] or [SCRIPT, ...]); stdout and stderr go to
        files (stderr None: into stdout's file, as `stderr=STDOUT`)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": env, "stdout": str(stdout),
                   "stderr": None if stderr is None else str(stderr)}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        answer = self.message(timeout=60)
        assert "pid" in answer, answer
        return ZygoteProcess(self, answer["pid"], [sys.executable, *request["argv"]])

    def message(self, timeout: float) -> dict:
        """The next answer that is not an exit (exits are recorded as they come)."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not self.readable(0):
                raise RuntimeError(f"the zygote server did not answer (exit {self.proc.poll()})")
            self.pump(min(left, 0.5))
        return self.pending.pop(0)

    def readable(self, timeout: float) -> bool:
        return bool(select.select([self.proc.stdout], [], [], timeout)[0])

    def pump(self, timeout: float) -> None:
        """Read what the server wrote within `timeout` seconds."""
        if self.proc is None or not self.readable(timeout):
            return
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:  # the server ended: no exit status will ever come (rather than wait forever)
            raise RuntimeError(f"the zygote server ended (exit {self.proc.wait()})")
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if "exit" in msg:
                self.exits[msg["exit"]] = msg["status"]
            else:
                self.pending.append(msg)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the server ---------------------------------------------------------------------------------

def _child(request: dict) -> None:
    """In the forked process: become `python ARGV` and run it; never returns to the server loop."""
    import io
    import runpy

    env = request["env"]
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    err = out if request["stderr"] is None else os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
    # The standard streams a fresh interpreter would make for these files and this environment.
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    encoding = sys.stdout.encoding
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding=encoding)
    raw_out, raw_err = io.FileIO(1, "w", closefd=False), io.FileIO(2, "w", closefd=False)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(raw_out if unbuffered else io.BufferedWriter(raw_out),
                                                   encoding=encoding, write_through=unbuffered)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(raw_err if unbuffered else io.BufferedWriter(raw_err),
                                                   encoding=encoding, errors="backslashreplace",
                                                   line_buffering=True, write_through=unbuffered)
    argv = request["argv"]
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()  # as `python -m` sets it
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python SCRIPT` sets it
        runpy.run_path(argv[0], run_name="__main__")
    sys.exit(0)


def _serve() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    # As the gc docs advise for a process that forks without exec: else every full collection in
    # every child walks torch's objects again (a third of a short training run's CPU).
    gc.freeze()
    send = sys.stdout.buffer

    def answer(msg: dict) -> None:
        send.write(json.dumps(msg).encode() + b"\n")
        send.flush()

    answer({"ready": True})
    stdin, buffer, children = sys.stdin.buffer.raw, b"", set()
    while True:
        while children:  # reap what ended; its exit status goes to the client
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            answer({"exit": pid, "status": os.waitstatus_to_exitcode(status)})
        if not select.select([stdin], [], [], 0.02 if children else None)[0]:
            continue
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:  # the client is gone: end the children it left and exit
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(request)
            children.add(pid)
            answer({"pid": pid})


if __name__ == "__main__":
    _serve()
