"""Helpers for the reliability suite: run tests/reliability/scripts/fault_fit.py as real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _forkserver import server

TESTS = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "scripts" / "fault_fit.py"
PG_TIMEOUT_S = 20  # the strategy's process-group timeout in the scripts
RUN_LIMIT_S = 240  # hard limit for one scripted run (a hang fails the test instead of blocking it)
_LAUNCH_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables, with tests/ importable and one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV and k != "TORCH_DISTRIBUTED_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """A finished scripted run: exit codes and exit times by process name, output, and what each
    process recorded (``rank0``/``rank1`` for the ranks, ``main`` for spawn's main process)."""

    out: Path
    returncodes: dict[str, int]
    ended: dict[str, float]
    output: str
    records: dict[str, dict] = field(default_factory=dict)

    @property
    def fault_time(self) -> float:
        return json.loads((self.out / "fault.json").read_text())["time"]

    def seconds_to_exit(self) -> dict[str, float]:
        """Seconds from the injected fault to the exit of every process this test started (an upper
        bound) and to the last record of every other rank."""
        times = {name: t - self.fault_time for name, t in self.ended.items()}
        for name, record in self.records.items():
            times.setdefault(name, record["time"] - self.fault_time)
        return times


def run_fault_fit(out: Path, *args: str, launch: str = "external", world: int = 2) -> Run:
    """Run the fault script with ``world`` ranks and wait for every process (bounded by ``RUN_LIMIT_S``).

    ``external``: this function starts both ranks (like torchrun; each a process forked from
    tests/_forkserver.py's server) and sees each exit code; ``slurm``: the same with the variables srun
    sets (``scontrol`` is a stand-in on ``PATH`` that records its arguments in ``out/scontrol.txt``);
    ``popen`` / ``spawn``: it starts the script once in a new interpreter and Lightning starts the
    other rank(s).
    """
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SCRIPT), str(out), "--launch", launch, "--timeout", str(PG_TIMEOUT_S)]
    cmd += ["--devices", str(world), *args]
    start = time.time()
    if launch == "external":
        port = str(_free_port())
        envs = {
            f"rank{r}": clean_env(LOCAL_RANK=str(r), NODE_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=port)
            for r in range(world)
        }  # fmt: skip
    elif launch == "slurm":
        bin_dir = out / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {out / "scontrol.txt"}\n')
        (bin_dir / "scontrol").chmod(0o755)
        slurm = dict(SLURM_JOB_ID="4242", SLURM_JOB_NAME="fault_fit", SLURM_NTASKS=str(world), SLURM_NTASKS_PER_NODE=str(world),
                     SLURM_NNODES="1", SLURM_NODEID="0", SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(_free_port()),
                     PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
        envs = {f"rank{r}": clean_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **slurm) for r in range(world)}
    else:
        envs = {"rank0" if launch == "popen" else "main": clean_env()}
    logs = {}  # closed in the finally below
    if launch in ("external", "slurm"):  # each rank a process forked from the fork server (imports paid once)
        fork = server()
        procs = {
            name: fork.start(cmd[1:], env=env, cwd=os.getcwd(), stdout=out / f"{name}.log")
            for name, env in envs.items()
        }
    else:  # the script in a new interpreter, and Lightning starts the other processes: the launch under test
        logs = {name: open(out / f"{name}.log", "w") for name in envs}
        procs = {
            name: subprocess.Popen(cmd, env=env, stdout=logs[name], stderr=subprocess.STDOUT, text=True)
            for name, env in envs.items()
        }
    codes, ended = {}, {}
    try:
        while len(codes) < len(procs) and time.time() - start < RUN_LIMIT_S:
            for name, proc in procs.items():
                if name not in codes and proc.poll() is not None:
                    codes[name], ended[name] = proc.returncode, time.time()
            time.sleep(0.05)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in logs.values():
            f.close()
    output = "\n".join(f"----- {name} -----\n{(out / f'{name}.log').read_text()}" for name in envs)
    assert len(codes) == len(procs), f"a process ran past {RUN_LIMIT_S}s (hang):\n{output[-6000:]}"
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if p.stem != "fault"}
    return Run(out, codes, ended, output, records)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting to be reaped counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status
