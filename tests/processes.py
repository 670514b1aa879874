"""Child processes in tests, robust on a busy machine: ports come from the OS, every child runs in its own
process group that is killed whole (grandchildren too: torchrun's workers, DeepSpeed's ranks, loader workers)
when a test gives up on it, and time limits only guard against hangs, never assert a speed.

``LTSAM_TEST_TIMEOUT`` (seconds, default 1200) bounds each child: long enough for a CI machine at a load of 10.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

TIMEOUT_S = float(os.environ.get("LTSAM_TEST_TIMEOUT", "1200"))
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port the OS says is free now (bound to port 0 and released), for a rendezvous or master port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    """torchrun on this host: ``--standalone`` rendezvouses on a port the OS picks (endpoint localhost:0)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def env_with(extra: dict[str, str] | None = None, tests_on_path: bool = False) -> dict[str, str]:
    """This environment, one intra-op thread per child (two cores shared by many), plus ``extra``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if tests_on_path:
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, **(extra or {})}


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it leads one: ``start_new_session``), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def started(cmd: Sequence[str], **popen_kwargs) -> Iterator[subprocess.Popen]:
    """``Popen`` in a new session (text mode); the group is killed when the block ends, however it ends."""
    proc = subprocess.Popen(list(cmd), start_new_session=True, text=True, **popen_kwargs)
    try:
        yield proc
    finally:
        kill_group(proc)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT_S, stdin: str | None = None) -> tuple[str, str]:
    """``communicate`` that kills the group and fails the test, with the output so far, after ``timeout``."""
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args!r} did not end within {timeout:.0f} s (killed with its process group):\n"
                    f"{(out or '')[-2000:]}{(err or '')[-4000:]}")
    return out or "", err or ""


def run(cmd: Sequence[str], *, timeout: float = TIMEOUT_S, check: bool = False, **popen_kwargs
        ) -> subprocess.CompletedProcess:
    """``subprocess.run(capture_output=True, text=True)`` whose timeout kills the whole process group."""
    with started(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_kwargs) as proc:
        out, err = finish(proc, timeout)
    if check:
        assert proc.returncode == 0, f"{list(cmd)!r} exited {proc.returncode}:\n{out[-2000:]}{err[-4000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> None:
    """Poll ``ready`` while ``proc`` runs; fails (and kills it) only when it ends first or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"{proc.args!r} exited {proc.returncode} before it was ready:\n{(out or '')[-2000:]}"
                        f"{(err or '')[-4000:]}")
        if time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail(f"{proc.args!r} was not ready within {timeout:.0f} s (killed with its process group)")
        time.sleep(0.05)


def join(context, timeout: float = TIMEOUT_S) -> None:
    """Wait for ``torch.multiprocessing.start_processes(..., join=False)``; kill every process after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            pytest.fail(f"{len(context.processes)} processes did not end within {timeout:.0f} s (killed)")


def forked_ranks(target: Callable[[int], int], world: int, logs: Path, timeout: float = TIMEOUT_S) -> list[int]:
    """``target(rank)`` in ``world`` forked processes joined as one gloo group (``env://`` on a free port), each
    with its stderr in ``logs/rank{N}.log``; returns their exit codes. Forked children keep the imports already
    made (torch, timm: seconds per process), which is what makes several multi-process runs fit in a test."""
    import multiprocessing

    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)

    def child(rank: int) -> None:
        os.setsid()  # its own group: loader workers it forks go with it
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(logs / f"rank{rank}.log", "w") as log:
            os.dup2(log.fileno(), 2)
            sys.stderr = log  # not pytest's capture, which the fork inherited
            code = 1
            try:
                code = target(rank)
            except SystemExit as err:  # what the interpreter would do with it
                if err.code is not None and not isinstance(err.code, int):
                    print(err.code, file=sys.stderr)
                code = err.code if isinstance(err.code, int) else int(err.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)

    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=child, args=(rank,)) for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0.0))
    if any(proc.is_alive() for proc in procs):
        for proc in procs:
            if proc.is_alive():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.join()
        pytest.fail(f"{world} forked ranks did not end within {timeout:.0f} s (killed)")
    return [proc.exitcode for proc in procs]
