"""Where sweep points run: a local process pool, or a Ray cluster.

Each point runs in a process of its own, so one that fails (an exception, a crash, a kill) is
reported and the others go on; ``concurrent.futures.ProcessPoolExecutor`` would instead break
the whole pool when one worker dies. Workers get ``threads`` torch threads each, so that
``workers * threads`` matches the cores instead of oversubscribing them.

This module imports torch only inside functions: the worker sets its thread count first.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import math
import multiprocessing
import os
import signal
import sys
import tarfile
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Protocol

from contsparse.errors import RunInterrupted, UserError

TOKEN_FILE = ".sweep-token"
_PR_SET_PDEATHSIG = 1

MAX_THREADS = 1024  # torch.set_num_threads overflows far above; no machine has more cores per point


@dataclass(frozen=True)
class PointJob:
    name: str
    path: str  # the point's run directory
    config: dict[str, Any]  # RunConfig fields
    log_path: str
    sweep_dir: str
    threads: int = 1
    cuda_device: str | None = None  # local pool on a multi-GPU machine: the point's GPU (a CUDA_VISIBLE_DEVICES entry)
    force: bool = False  # resume a point whose saved settings differ (the new ones are saved)


@dataclass
class PointOutcome:
    name: str
    status: str  # done | failed | interrupted
    summary: dict[str, Any] | None = None
    message: str = ""
    threads: int | None = None  # torch threads the point ran with
    files: bytes | None = None  # Ray without a shared file system: the run directory as a tarball


class Executor(Protocol):
    capacity: int  # points running at once

    def start(self, job: PointJob) -> None: ...
    def wait(self, timeout: float) -> list[PointOutcome]: ...
    def interrupt(self) -> list[PointOutcome]: ...
    def close(self) -> None: ...


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def visible_gpus(count: int) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entries of this machine's first ``count`` visible GPUs: a
    point's own variable must name the GPU the user left visible (``2,3`` -> ``2`` and ``3``, UUIDs
    and MIG entries as they are), not an index, which CUDA would read as a physical GPU."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]


def run_point(job: PointJob) -> PointOutcome:
    """Run one point in this process (a pool worker or a Ray task); never raises."""
    os.environ["OMP_NUM_THREADS"] = str(job.threads)
    os.environ["TQDM_DISABLE"] = "1"  # one display for the sweep, in the driver
    for name in TORCHRUN_VARIABLES:  # a sweep started inside a torchrun job: each point is a run of its own
        os.environ.pop(name, None)
    if job.cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = job.cuda_device
    import torch

    from contsparse.experiments.config import make_config
    from contsparse.experiments.runner import Runner

    torch.set_num_threads(job.threads)
    Path(job.log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(job.log_path, "a", buffering=1) as log:
        def write(message: str) -> None:
            log.write(message + "\n")
        try:
            summary = Runner(make_config(job.config), job.path, write, force=job.force, sweep_point=True).execute()
            return PointOutcome(job.name, "done", summary, threads=torch.get_num_threads())
        except RunInterrupted as stopped:
            write(str(stopped))
            return PointOutcome(job.name, "interrupted", message=str(stopped), threads=job.threads)
        except KeyboardInterrupt:  # stopped before training began (or a second Ctrl-C)
            write("interrupted")
            return PointOutcome(job.name, "interrupted", message="interrupted", threads=job.threads)
        except UserError as err:
            write(f"error: {err}")
            return PointOutcome(job.name, "failed", message=str(err), threads=job.threads)
        except BaseException as err:  # a point's bug must not take the sweep down
            log.write(traceback.format_exc())
            return PointOutcome(job.name, "failed", message=f"{type(err).__name__}: {err} (see {job.log_path})",
                                threads=job.threads)


# -- local processes -------------------------------------------------------------------------------
def _worker_main(connection: Connection, job: PointJob, driver: int, stop: Any) -> None:
    # Own process group: a Ctrl-C in the terminal reaches the driver only, which then asks each
    # point once to checkpoint and stop (a second signal would mean "stop at once"). SIGINT was
    # ignored while this process started (see LocalPool.start); from here on it stops the point.
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _stop_with(driver)
    if stop.is_set():  # the driver's SIGINT came while it was still ignored
        return _send(connection, PointOutcome(job.name, "interrupted", message="stopped before it began"))
    # The point's output goes to its log, not into the driver's progress display.
    Path(job.log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(job.log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        outcome = run_point(job)
    except KeyboardInterrupt:  # while importing, before run_point's own handling
        outcome = PointOutcome(job.name, "interrupted", message="stopped before it began")
    _send(connection, outcome)


def _send(connection: Connection, outcome: PointOutcome) -> None:
    with contextlib.suppress(OSError):  # the driver is gone: the run directory says it all
        connection.send(outcome)
        connection.close()


def _stop_with(driver: int) -> None:
    """SIGTERM this worker (checkpoint, then exit) when the driver dies, whatever killed it: a
    point must not train on, holding its run's lock, after its sweep is gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != driver:  # it died before the request above
        os.kill(os.getpid(), signal.SIGTERM)


class LocalPool:
    """``workers`` points at a time, each in a fresh (spawned) process with ``threads`` threads."""

    def __init__(self, workers: int, threads: int | None = None, cuda_devices: int = 0) -> None:
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        if threads is not None and not 1 <= threads <= MAX_THREADS:
            raise UserError(f"--threads must be in [1, {MAX_THREADS}], got {threads}")
        self.capacity = workers
        self.threads = threads or max(1, available_cores() // workers)
        self._gpus = visible_gpus(cuda_devices)
        self._context = multiprocessing.get_context("spawn")
        self._live: dict[str, tuple[Any, Connection]] = {}
        self._gpu_of: dict[str, int] = {}
        self._received: dict[str, PointOutcome] = {}  # read from a worker, kept until it has been joined
        self._stop = self._context.Event()  # set with the SIGINTs, for points still starting up

    def start(self, job: PointJob) -> None:
        gpu = None
        if len(self._gpus) > 1:  # the least busy GPU
            busy = list(self._gpu_of.values())
            index = min(range(len(self._gpus)), key=busy.count)
            self._gpu_of[job.name] = index
            gpu = self._gpus[index]
        job = replace(job, threads=self.threads, cuda_device=gpu)
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_worker_main, args=(send, job, os.getpid(), self._stop),
                                        name=f"contsparse-{job.name}", daemon=False)
        # The child starts with SIGINT ignored (it inherits that), so a Ctrl-C while it imports
        # torch cannot kill it with a traceback; _worker_main then restores the handler.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        send.close()
        self._live[job.name] = (process, receive)

    def wait(self, timeout: float) -> list[PointOutcome]:
        if not self._live:
            return []
        # The result pipe too, not only the process: a worker whose outcome does not fit the
        # pipe's buffer blocks in send() until it is read, and would never exit
        ready = wait([handle for process, receive in self._live.values() for handle in (process.sentinel, receive)],
                     timeout)
        out = []
        for name, (process, receive) in list(self._live.items()):
            if process.sentinel in ready or receive in ready:
                out.append(self._collect(name, process, receive))
        return out

    def _collect(self, name: str, process: Any, receive: Connection) -> PointOutcome:
        # What the worker sent is kept before the join (a worker takes a while to exit): a Ctrl-C
        # during the join must not turn a finished point into a dead worker when collected again.
        outcome = self._received.get(name)
        try:
            if outcome is None and receive.poll():
                outcome = self._received[name] = receive.recv()
        except (EOFError, OSError):
            pass
        process.join()
        receive.close()
        del self._live[name]
        self._received.pop(name, None)
        self._gpu_of.pop(name, None)
        if outcome is None:
            code = process.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            if self._stop.is_set():  # stopped by the sweep's own Ctrl-C (a second one: at once)
                return PointOutcome(name, "interrupted", message=f"stopped ({how})", threads=self.threads)
            outcome = PointOutcome(name, "failed", message=f"the worker process died ({how})", threads=self.threads)
        return outcome

    def interrupt(self, grace_seconds: float = 120.0) -> list[PointOutcome]:
        """Ask every running point to checkpoint and stop (SIGINT once), wait for them; a second
        Ctrl-C meanwhile stops them at once."""
        self._stop.set()
        for process, _ in self._live.values():
            _signal(process.pid, signal.SIGINT)
        out = []
        deadline = time.monotonic() + grace_seconds
        try:
            for name, (process, receive) in list(self._live.items()):
                ready = wait([process.sentinel, receive], max(0.0, deadline - time.monotonic()))
                out.append(self._collect(name, process, receive) if ready
                           else PointOutcome(name, "interrupted", message="did not stop in time"))
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, and say how each point ended
            for process, _ in self._live.values():
                _signal(process.pid, signal.SIGINT)
            for name, (process, receive) in list(self._live.items()):
                ready = wait([process.sentinel, receive], 10.0)
                out.append(self._collect(name, process, receive) if ready
                           else PointOutcome(name, "interrupted", message="stopped at once"))
        return out

    def close(self) -> None:
        for process, receive in self._live.values():
            _signal(process.pid, signal.SIGKILL)
            process.join()
            receive.close()
        self._live.clear()


def _signal(pid: int | None, sig: int) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# -- Ray ---------------------------------------------------------------------------------------------
def run_point_anywhere(job: PointJob, token: str) -> PointOutcome:
    """A Ray task: run in the sweep directory if this machine sees it (shared file system), else in
    a temporary directory whose files travel back to the driver in the outcome."""
    marker = Path(job.sweep_dir) / TOKEN_FILE
    try:
        shared = marker.read_text() == token
    except OSError:
        shared = False
    if shared:
        return run_point(job)
    with tempfile.TemporaryDirectory(prefix="contsparse-point-") as tmp:
        local = replace(job, path=str(Path(tmp) / job.name), log_path=str(Path(tmp) / "logs" / f"{job.name}.log"))
        outcome = run_point(local)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name in (job.name, "logs"):
                if (Path(tmp) / name).exists():
                    archive.add(Path(tmp) / name, arcname=name)
        outcome.files = buffer.getvalue()
        return outcome


def unpack_files(outcome: PointOutcome, sweep_dir: Path) -> None:
    """Put a remote point's run directory and log into the sweep directory."""
    if outcome.files:
        with tarfile.open(fileobj=io.BytesIO(outcome.files), mode="r:gz") as archive:
            archive.extractall(sweep_dir, filter="data")
        outcome.files = None


def ray_slots(nodes: list[dict], threads: int, gpus: float) -> int:
    """How many points the alive nodes of a Ray cluster (``ray.nodes()``) run at once, each
    asking for ``threads`` CPUs and ``gpus`` GPUs on one node."""
    slots = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        fits = int(resources.get("CPU", 0) // threads)
        if gpus > 0:
            fits = min(fits, int(resources.get("GPU", 0) / gpus + 1e-9))  # 1 / 0.1: 10, not 9
        slots += fits
    return slots


def make_executor(sweep_dir: Path, points: int, device: str, ray_address: str | None = None,
                  threads: int | None = None, gpus_per_point: float = 0.0, workers: int | None = None) -> Executor:
    """Where a sweep's points run: Ray tasks when ``ray_address`` is given, else a local pool of
    ``workers`` processes (default: one per GPU, else one per core, never more than the points)."""
    if gpus_per_point and not ray_address:
        raise UserError("--gpus-per-point is for Ray tasks (--ray-address); on this machine each point gets a GPU "
                        "of its own when there are GPUs")
    if ray_address:
        return RayExecutor(ray_address, sweep_dir, 1 if threads is None else threads, gpus_per_point)
    gpus = 0
    if device in ("auto", "cuda"):  # spread the points over the GPUs (cuda:N pins them all)
        import torch

        gpus = torch.cuda.device_count()
    return LocalPool(workers if workers is not None else min(gpus or available_cores(), points), threads, gpus)


class RayExecutor:
    """Each point a Ray task asking for ``threads`` CPUs (and ``gpus`` GPUs).

    ``address``: ``auto`` (the cluster this machine belongs to, or ``RAY_ADDRESS``), ``local`` (a
    Ray started for this sweep on this machine) or ``HOST:PORT``.
    """

    def __init__(self, address: str, sweep_dir: Path, threads: int = 1, gpus: float = 0.0) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--ray-address needs Ray: pip install 'contsparse[ray]'") from None
        if not 1 <= threads <= MAX_THREADS or not (math.isfinite(gpus) and gpus >= 0):
            raise UserError(f"--threads must be in [1, {MAX_THREADS}] and --gpus-per-point >= 0")
        self._ray = ray
        try:
            # "local" starts a Ray for this sweep; "auto" and HOST:PORT join a running cluster.
            ray.init(address=address, log_to_driver=False,
                     include_dashboard=False, configure_logging=False,
                     runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"cannot connect to Ray at {address}: {str(err).splitlines()[0]}") from None
        slots = ray_slots(ray.nodes(), threads, gpus)
        if slots == 0:
            need = f"{threads} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus else "")
            if address == "local":  # a Ray of this machine alone: the tasks would wait forever
                ray.shutdown()
                raise UserError(f"no node of the Ray cluster at {address} has {need} for one point; "
                                "lower --threads or --gpus-per-point")
            # A cluster may grow on demand (autoscaling): say so, and let the points wait for it.
            print(f"warning: no node of the Ray cluster at {address} has {need} for one point now; the points "
                  "wait until one joins (Ctrl-C stops them)", file=sys.stderr)
        self.capacity = max(1, slots)
        sweep_dir = sweep_dir.resolve()  # workers may start elsewhere: an absolute path or nothing
        try:  # only now: a sweep refused above leaves no directory behind
            sweep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            ray.shutdown()
            raise UserError(f"cannot create the sweep directory {sweep_dir}: {err.strerror or err}") from None
        self.sweep_dir = sweep_dir
        self.threads = threads
        self._token = uuid.uuid4().hex
        (sweep_dir / TOKEN_FILE).write_text(self._token)
        self._task = ray.remote(run_point_anywhere).options(num_cpus=threads, num_gpus=gpus, max_retries=0)
        self._live: dict[Any, str] = {}

    def start(self, job: PointJob) -> None:
        self._live[self._task.remote(replace(job, threads=self.threads), self._token)] = job.name

    def wait(self, timeout: float) -> list[PointOutcome]:
        if not self._live:
            return []
        ready, _ = self._ray.wait(list(self._live), num_returns=len(self._live), timeout=timeout)
        return [self._collect(ref) for ref in ready]

    def _collect(self, ref: Any) -> PointOutcome:
        name = self._live.pop(ref)
        try:
            outcome = self._ray.get(ref)
        except self._ray.exceptions.TaskCancelledError:
            return PointOutcome(name, "interrupted", message="cancelled")
        except self._ray.exceptions.RayError as err:
            return PointOutcome(name, "failed", message=f"Ray: {str(err).splitlines()[0]}")
        unpack_files(outcome, self.sweep_dir)
        return outcome

    def interrupt(self, grace_seconds: float = 120.0) -> list[PointOutcome]:
        """Ask every task to checkpoint and stop (a KeyboardInterrupt inside it), wait up to
        ``grace_seconds``; tasks still running then, or at a second Ctrl-C, are killed (their
        last checkpoint stays)."""
        for ref in self._live:
            self._ray.cancel(ref)
        out = []
        try:
            ready, _ = self._ray.wait(list(self._live), num_returns=len(self._live), timeout=grace_seconds)
            out = [self._collect(ref) for ref in ready]
        except KeyboardInterrupt:
            pass
        for ref, name in list(self._live.items()):
            self._ray.cancel(ref, force=True)
            del self._live[ref]
            out.append(PointOutcome(name, "interrupted", message="did not stop in time; stopped at once"))
        return out

    def close(self) -> None:
        (self.sweep_dir / TOKEN_FILE).unlink(missing_ok=True)
        self._ray.shutdown()
