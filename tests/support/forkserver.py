"""Run the entry points (run.py, engine.profile) many times without paying Python's start-up each time.

A server process imports torch, deepspeed and the entry points once (and runs no tensor operation, so forking
it is safe), then forks a fresh process per rank for each job it is sent. A child is what the command line would
have started: it gets the job's environment, working directory and argv, writes its stdout and stderr to the
job's log file, calls the entry point's main() and exits with its status (a traceback for an exception, as the
interpreter prints one). A 2-rank job gets what the deepspeed launcher gives its ranks (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT, CROSS_RANK, CROSS_SIZE and ``--local_rank=N``), and like the
launcher the server ends the other ranks when one exits with an error; a job past its timeout is killed whole.

Used by the configuration matrix (tests/support/config_matrix.py), whose ~50 short runs otherwise spend most of
their time importing torch and deepspeed (3 s per process, three processes per 2-rank run with the launcher).

    with ForkServer() as server:
        rc, cpu_s = server.run("run", ["--config", "c.json"], world=1, env={...}, cwd=ROOT, log=path, timeout=300)
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {"run": "run", "profile": "engine.profile"}
ARGV0 = {"run": "run.py", "profile": str(ROOT / "engine" / "profile.py")}  # sys.argv[0] as python would set it
# What the entry points import lazily on every run (the rest, e.g. DALI, each run imports itself).
PRELOAD = ("torch", "deepspeed", "engine.config", "engine.train.build", "engine.parallel.deepspeed_backend",
           "engine.parallel.fsdp_backend", "engine.perf.profiler", "engine.state.checkpoint", "engine.config.dataset",
           "engine.runtime.faults", "backbones", "heads")
FAILED_RANK_GRACE_S = 10.0  # the other ranks of a job whose rank failed get this long to exit by themselves


# ---------------------------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------------------------

class ForkServer:
    """The client: starts the server, sends it jobs (thread-safe: several may run at once) and stops it."""

    def __init__(self, python: str = sys.executable):
        self.proc = subprocess.Popen([python, "-m", "tests.support.forkserver"], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        self._lock = threading.Lock()
        self._results: Dict[int, Dict[str, Any]] = {}
        self._done = threading.Condition(self._lock)
        self._next_id = 0
        ready = self.proc.stdout.readline()
        if json.loads(ready or "{}").get("ready") is not True:
            raise RuntimeError(f"tests/support/forkserver.py did not start: {ready!r}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._done:
                self._results[msg["id"]] = msg
                self._done.notify_all()
        with self._done:  # the server is gone: wake every waiter
            self._results[-1] = {"error": "fork server exited"}
            self._done.notify_all()

    def run(self, entry: str, args: List[str], *, world: int, env: Dict[str, str], cwd: Path, log: Path,
            timeout: float, port: int = 0) -> Tuple[Optional[int], float]:
        """Run `entry` ("run" or "profile") with `args` on `world` ranks; returns (exit status, None on a
        timeout; CPU seconds of its ranks)."""
        with self._done:
            job_id = self._next_id
            self._next_id += 1
            self.proc.stdin.write(json.dumps({"id": job_id, "entry": entry, "args": args, "world": world,
                                              "env": env, "cwd": str(cwd), "log": str(log), "timeout": timeout,
                                              "port": port}) + "\n")
            self.proc.stdin.flush()
            while job_id not in self._results:
                if -1 in self._results:
                    raise RuntimeError("tests/support/forkserver.py exited with jobs running")
                self._done.wait()
            msg = self._results.pop(job_id)
        return msg["rc"], msg["cpu"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ForkServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------------------

def _child(main, job: Dict[str, Any], rank: int, pgid: int) -> None:
    """In the forked rank: become the command line's process and never return."""
    rc = 1
    try:
        os.setpgid(0, pgid)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = open(os.devnull)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        args = list(job["args"])
        if job["world"] > 1:  # what the deepspeed launcher gives each local rank
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job["world"]),
                              LOCAL_SIZE=str(job["world"]), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["port"]),
                              CROSS_RANK="0", CROSS_SIZE="1")
            args.append(f"--local_rank={rank}")
        sys.argv = [ARGV0[job["entry"]]] + args
        try:
            rc = main(args)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        rc = 0 if rc is None else int(rc)
    except BaseException:  # noqa: BLE001 -- the interpreter's own report of an uncaught exception
        traceback.print_exc()
        rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def serve() -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    # The protocol gets its own descriptor; whatever an import prints (deepspeed's accelerator line) goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import importlib

    for module in PRELOAD:  # imported once here, inherited by every fork
        importlib.import_module(module)
    mains = {name: importlib.import_module(module).main for name, module in ENTRY_POINTS.items()}
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    jobs: Dict[int, Dict[str, Any]] = {}  # id -> job with "pids" {pid: rank}, "rc", "cpu", "start", "failed_at"
    owner: Dict[int, int] = {}  # pid -> job id
    stdin_open = True
    while stdin_open or jobs:
        readable = select.select([sys.stdin], [], [], 0.05)[0] if stdin_open else []
        if readable:
            line = sys.stdin.readline()
            if not line:
                stdin_open = False
            else:
                job = json.loads(line)
                job.update(pids={}, rc=None, cpu=0.0, start=time.monotonic(), failed_at=None, killed=False)
                pgid = 0
                for rank in range(job["world"]):
                    pid = os.fork()
                    if pid == 0:
                        out.close()  # the protocol's descriptor is the server's alone
                        _child(mains[job["entry"]], job, rank, pgid)
                    if pgid == 0:
                        pgid = pid
                    try:
                        os.setpgid(pid, pgid)  # also from here: no race with the child's own call
                    except OSError:
                        pass
                    job["pids"][pid] = rank
                    owner[pid] = job["id"]
                job["pgid"] = pgid
                jobs[job["id"]] = job
        while owner:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if not pid:
                break
            job = jobs[owner.pop(pid)]
            del job["pids"][pid]
            rc = os.waitstatus_to_exitcode(status)
            job["cpu"] += usage.ru_utime + usage.ru_stime
            if rc != 0 and (job["rc"] in (None, 0)):
                job["rc"] = rc
                job["failed_at"] = job["failed_at"] or time.monotonic()
            elif job["rc"] is None:
                job["rc"] = rc
        now = time.monotonic()
        for job_id, job in list(jobs.items()):
            overdue = now - job["start"] > job["timeout"]
            abandoned = job["failed_at"] is not None and now - job["failed_at"] > FAILED_RANK_GRACE_S
            if job["pids"] and (overdue or abandoned) and not job["killed"]:
                try:
                    os.killpg(job["pgid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
                job["killed"] = True
                if overdue:
                    job["rc"] = None
                    job["timed_out"] = True
            if not job["pids"]:
                rc = None if job.get("timed_out") else job["rc"]
                out.write(json.dumps({"id": job_id, "rc": rc, "cpu": job["cpu"]}) + "\n")
                out.flush()
                del jobs[job_id]
    return 0


if __name__ == "__main__":
    sys.exit(serve())
