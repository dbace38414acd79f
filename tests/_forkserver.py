"""Start the tests' short-lived processes without paying Python's imports each time: a fork server.

A new interpreter spends about 10 s of a 2-core machine's CPU importing torch and Lightning before
it runs a line of a test's command. Tests that start many such processes the way a launcher or a
user would (each rank of ``tests/reliability/scripts/fault_fit.py`` started like torchrun or srun,
each ``python -m lightning_tp fit --config bad.yaml``) fork them instead from one server process
that imported those modules once per test session. Each child is then that command: its own
arguments, environment, working directory, standard input (``/dev/null``), output files and process
group; a real process with a real exit status (or signal), and an interpreter that exits the normal
way (``atexit`` handlers, the traceback of an uncaught exception on stderr), like a new one but for
the modules already imported. Paths that start interpreters themselves (Lightning's popen and spawn
launchers, the README's main job) do not go through here and keep testing that.

    child = server().start(["-m", "lightning_tp", "fit", ...], env=env, cwd=tmp, stdout=path)
    child.wait(timeout=240)   # the exit code, as subprocess.Popen.returncode gives it

Run as a script it is the server: it imports the modules named on its command line, then forks one
child per JSON request line on stdin, answers each with the child's pid, and writes every child's
exit code to the file the request named when it ends.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

PRELOAD = ("torch", "lightning.pytorch", "lightning_tp", "lightning_tp.cli", "transformers")
START_LIMIT_S = 180  # the server's imports (first request) or one fork must answer within this


@dataclass
class Child:
    """A process the server forked (``pid`` leads its own process group)."""

    pid: int
    rc_file: Path
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.rc_file.exists():
            self.returncode = int(self.rc_file.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit code; kills the child's process group and raises ``TimeoutError`` past ``timeout``."""
        deadline = time.time() + (timeout if timeout is not None else float("inf"))
        while self.poll() is None:
            if time.time() > deadline:
                self.kill()
                raise TimeoutError(f"process {self.pid} ran past {timeout}s")
            time.sleep(0.02)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL to the child and every process it started (its process group), then its exit."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        end = time.time() + 10
        while self.poll() is None and time.time() < end:
            time.sleep(0.02)


class ForkServer:
    def __init__(self, preload: tuple[str, ...] = PRELOAD):
        tests = str(Path(__file__).resolve().parent)
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
        # what the children's interpreters would read at start-up: tests/ importable, one thread per process
        env.update(PYTHONPATH=os.pathsep.join([tests, env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")  # fmt: skip
        self._dir = Path(tempfile.mkdtemp(prefix="forkserver-"))
        self._count = 0
        self._proc = subprocess.Popen(
            [sys.executable, __file__, *preload], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )

    def start(self, argv: list[str], *, env: dict[str, str], cwd: str | Path, stdout: str | Path,
              stderr: str | Path | None = None) -> Child:  # fmt: skip
        """Fork ``python ARGV`` (``["-m", module, ...]``, ``["-c", code, ...]`` or ``[script, ...]``);
        stderr goes to ``stdout``'s file unless a file of its own is named."""
        self._count += 1
        rc_file = self._dir / f"{self._count}.rc"
        request = {"argv": [str(a) for a in argv], "env": env, "cwd": str(cwd), "stdout": str(stdout),
                   "stderr": str(stderr) if stderr is not None else None, "rc": str(rc_file)}  # fmt: skip
        self._proc.stdin.write((json.dumps(request) + "\n").encode())
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], START_LIMIT_S)
        line = self._proc.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(
                f"the fork server did not answer within {START_LIMIT_S}s (exit code {self._proc.poll()})"
            )
        return Child(json.loads(line)["pid"], rc_file)

    def run(
        self, argv: list[str], *, env: dict[str, str], cwd: str | Path, timeout: float
    ) -> subprocess.CompletedProcess:
        """Like ``subprocess.run([python, *argv], capture_output=True, text=True, timeout=...)``."""
        out, err = self._dir / f"{self._count + 1}.out", self._dir / f"{self._count + 1}.err"
        child = self.start(argv, env=env, cwd=cwd, stdout=out, stderr=err)
        try:
            code = child.wait(timeout)
        except TimeoutError as e:
            raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text()) from e
        return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()  # the server kills what still runs and exits
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


_SERVER: ForkServer | None = None


def server() -> ForkServer:
    """The session's fork server, started on first use."""
    global _SERVER
    if _SERVER is None or _SERVER._proc.poll() is not None:
        _SERVER = ForkServer()
        atexit.register(_SERVER.close)
    return _SERVER


# ---- the server side ------------------------------------------------------------------------------


def _child(request: dict) -> None:
    """In the forked child: become ``python ARGV`` in the request's directory, environment and files."""
    os.setpgid(0, 0)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    out = os.open(request["stdout"], flags)
    err = os.open(request["stderr"], flags) if request["stderr"] else out
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the process's own stdin, /dev/null now)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    argv = request["argv"]
    import runpy

    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    elif argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = str(Path(argv[0]).resolve().parent)
        runpy.run_path(argv[0], run_name="__main__")
    sys.exit(0)


def _write_rc(path: str, code: int) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(str(code))
    os.replace(tmp, path)  # the client never reads half a file


def _serve() -> None:
    import gc
    import importlib

    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional extra that is not installed: the child imports what it needs
            pass
    # Python's last garbage collection at exit walks every object: about 2 s after these imports, in
    # each child. Frozen (what the server imported), they are left out of it and shared copy-on-write.
    gc.freeze()
    children: dict[int, str] = {}
    pending = b""
    stdin_open = True
    while stdin_open or children:
        if stdin_open:
            if select.select([0], [], [], 0.01)[0]:
                data = os.read(0, 1 << 16)
                stdin_open = bool(data)
                pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request)  # raises SystemExit (or the command's error) up to the interpreter's top
                try:  # here too, so that a kill of the group right after this answer cannot miss it
                    os.setpgid(pid, pid)
                except OSError:  # the child did it first, or has exited already
                    pass
                children[pid] = request["rc"]
                os.write(1, (json.dumps({"pid": pid}) + "\n").encode())
        else:  # the client is gone: nothing waits for what still runs
            for pid in children:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                _write_rc(children.pop(pid), os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    _serve()
