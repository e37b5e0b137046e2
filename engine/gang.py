"""A gang: one function run on N ranks as N processes joined by ``torch.distributed``, failing as one.

    result = run_gang(train_rank, args=(...), config=GangConfig(ranks=4, device_type="cuda"),
                      on_progress=lambda payload: ..., should_stop=lambda: ...)

    with Gang(GangConfig(ranks=2)) as gang:           # ranks kept warm between calls
        first = gang.run(train_rank, args=(job_1,))
        second = gang.run(train_rank, args=(job_2,))  # same processes, same process group, same loaded model

Interface (what the trainer integration builds on):

* ``fn(ctx, *args, **kwargs)`` runs in every rank after the process group is up; ``fn`` and its arguments must be
  picklable (a module-level function of an importable module). Each rank is a fresh interpreter
  (``subprocess``, never ``fork``; not ``multiprocessing`` either, whose children a daemonic process such as a
  Celery pool worker may not have), with the parent's ``sys.path``, talking to the parent over a socket pair.
  ``ctx`` is a :class:`RankContext`: ``rank``, ``world_size``, ``device`` (``cuda:<rank>`` or ``cpu``),
  ``report(payload)``, ``beat()`` and ``stop_requested()``. On the CPU each rank gets ``cores // ranks`` torch
  threads.
* Rank 0's ``ctx.report(payload)`` reaches the parent's ``on_progress(payload)``, in order; a report from any rank
  is also a heartbeat. Every rank must report or ``beat()`` at least every ``silence_timeout_s`` (once per
  optimizer step is plenty).
* ``should_stop()`` is polled by the parent; once it says True every rank's ``ctx.stop_requested()`` turns True.
  The ranks must agree on the step they stop at (the trainer all-reduces the flag), then save and return.
* Rank 0's return value is :meth:`Gang.run`'s (and :func:`run_gang`'s); the other ranks' are dropped. Rank 0 writes
  checkpoints.
* A :class:`Gang` keeps its processes between calls: module-level state of a rank (a loaded model) survives from
  one call to the next. Between calls the ranks wait for the next one and nothing watches their heartbeats; a rank
  that died meanwhile is found when the next call starts (:meth:`Gang.run` raises ``GangFailed`` at once).

Failure: a rank that raises, exits without a result, is killed, or stays silent longer than ``silence_timeout_s``
(``startup_timeout_s`` before its process group is up) fails the whole gang. The parent then sends SIGTERM to every
rank's process group (each rank is a session leader, so processes a rank started go too), SIGKILL after
``grace_s``, reaps them, and raises :class:`GangFailed`: the job layer treats it as a failed attempt and retries
from the last checkpoint. A failed gang is closed for good; the next call needs a new one. A collective waiting on
a dead or hung peer fails by itself after ``collective_timeout_s`` (the process group's timeout; NCCL with async
error handling), which the parent sees as that rank raising. Ranks also die with their parent
(``PR_SET_PDEATHSIG`` plus a parent-pid check), so a worker killed with ``kill -9`` leaves no rank holding a GPU.
``PR_SET_PDEATHSIG`` fires when the *thread* that started the ranks ends: start a gang from a thread that
outlives it (the worker's main thread). Every bound is a config value: a gang ends within
``silence_timeout_s + grace_s`` of a rank hanging (``collective_timeout_s + grace_s`` when that is shorter and its
peers wait on it in a collective), and within ``grace_s`` of a rank dying or raising; plus at most a second to tell
cause from consequence, and reaping. When one failure brings
others (peers lose their connection), the error names the cause: a rank killed by a signal first, else the
earliest failure by the ranks' own clocks. The exception a rank raised travels with :class:`GangFailed`
(``error``) when it can be pickled, so a caller can tell a deterministic error (bad data, a bad config: every
rank raises it) from a failure of the gang.

The rendezvous is a ``TCPStore`` hosted by the parent on a free loopback port (no port race; no MASTER_ADDR
guessing); gloo on the CPU, NCCL on CUDA with rank ``r`` pinned to ``cuda:r`` of the worker's visible GPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

_LOOPBACK = "127.0.0.1"
_POLL_S = 0.2
_SETTLE_S = 1.0  # after a first failure: how long to gather the others before naming the cause
_REAP_S = 10.0  # after SIGKILL: how long the parent waits for every process of the gang to be gone
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class GangConfig:
    """How many ranks, on what, and the bounds on failure detection (seconds)."""

    ranks: int
    device_type: str = "cpu"  # "cpu": gloo; "cuda": NCCL, rank r on cuda:r
    collective_timeout_s: float = 300.0  # a collective (all-reduce, barrier) waiting longer raises in its rank
    silence_timeout_s: float = 600.0  # a rank that neither reports nor beats for this long is hung
    startup_timeout_s: float = 300.0  # from start to the process group being up (imports, CUDA init)
    grace_s: float = 5.0  # SIGTERM, then SIGKILL after this

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise ValueError(f"ranks must be at least 1, got {self.ranks}")
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type must be cpu or cuda, got {self.device_type!r}")


class GangFailed(RuntimeError):
    """Raised when any rank of a gang failed; every rank has been stopped and reaped.

    A transient failure of the attempt (the job resumes from its last checkpoint on retry), not of the job.

    Attributes:
        rank: the rank that failed first; ``reason`` says how; ``rank_traceback`` is its traceback, if it raised;
        ``error`` the exception it raised, when it could be pickled (else None).
    """

    transient = True

    def __init__(self, rank: int, world_size: int, reason: str, rank_traceback: str | None = None,
                 error: BaseException | None = None):
        self.rank, self.world_size, self.reason, self.rank_traceback = rank, world_size, reason, rank_traceback
        self.error = error
        super().__init__(f"rank {rank} of {world_size} {reason}; every rank of the gang was stopped")

    def __reduce__(self):
        return (type(self), (self.rank, self.world_size, self.reason, self.rank_traceback, None))


class RankContext:
    """What a rank's function gets: who it is, where it runs, and its line to the parent."""

    def __init__(self, rank: int, world_size: int, device, conn: Connection):
        self.rank, self.world_size, self.device = rank, world_size, device
        self._conn = conn
        self._call = 0
        self._stop = False
        self._lock = threading.Lock()

    def _begin(self, call: int) -> None:
        with self._lock:
            self._call, self._stop = call, False

    def beat(self) -> None:
        """Tell the parent this rank is alive and making progress."""
        self._send(("beat",))

    def report(self, payload: Any) -> None:
        """A heartbeat; from rank 0 also ``on_progress(payload)`` in the parent. ``payload`` must be picklable."""
        self._send(("progress", payload) if self.rank == 0 else ("beat",))

    def stop_requested(self) -> bool:
        """True once the parent's ``should_stop`` said so (ranks must still agree on the step; see the module doc)."""
        with self._lock:
            while not self._stop and self._conn.poll():
                if self._conn.recv() == ("stop", self._call):  # a late stop of an earlier call is dropped
                    self._stop = True
        return self._stop

    def _send(self, message: tuple) -> None:
        with self._lock:
            self._conn.send(message)


# ----------------------------------------------------------------------------------------------- the parent


def run_gang(fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None, *, config: GangConfig,
             on_progress: Callable[[Any], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> Any:
    """Run ``fn(ctx, *args, **kwargs)`` once on a fresh gang of ``config.ranks`` processes; return rank 0's result.

    Raises:
        GangFailed: a rank raised, died, or hung; all ranks were stopped and reaped before this is raised.
    """
    with Gang(config) as gang:
        return gang.run(fn, args, kwargs, on_progress=on_progress, should_stop=should_stop)


class Gang:
    """``config.ranks`` rank processes in one process group, kept between calls of :meth:`run`.

    Start it from a thread that outlives it (see the module docstring); :meth:`close` (or the context manager)
    stops and reaps every rank. After a failure the gang is closed and :meth:`run` refuses.
    """

    def __init__(self, config: GangConfig):
        import torch.distributed as dist

        self.config = config
        self._calls = 0
        self._closed = False
        self._store = dist.TCPStore(_LOOPBACK, 0, None, True,
                                    timeout=datetime.timedelta(seconds=config.startup_timeout_s),
                                    wait_for_workers=False)
        self._ranks: list[_Rank] = []
        try:
            for rank in range(config.ranks):
                process = _RankProcess()
                self._ranks.append(_Rank(rank, process, process.conn, started=time.monotonic()))
                process.conn.send(("init", rank, config, self._store.port, os.getpid()))
        except BaseException:
            self.close()
            raise
        logger.info("gang of %d ranks on %s started: pids %s", config.ranks, config.device_type, self.pids())

    def pids(self) -> list[int]:
        """The rank processes' ids, rank 0 first."""
        return [r.process.pid for r in self._ranks]

    def live_ranks(self) -> int:
        """How many rank processes are alive (every one, in a healthy gang)."""
        if self._closed:
            return 0
        return sum(1 for r in self._ranks if r.process.is_alive())

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None, *,
            on_progress: Callable[[Any], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> Any:
        """Run ``fn(ctx, *args, **kwargs)`` on every rank; return rank 0's result.

        Raises:
            GangFailed: a rank raised, died (now or since the last call), or hung; the gang is closed (every rank
                stopped and reaped) before this is raised.
            RuntimeError: the gang is closed.
        """
        if self._closed:
            raise RuntimeError("this gang is closed (it failed or was closed); start a new one")
        self._calls += 1
        call = self._calls
        now = time.monotonic()
        for r in self._ranks:
            r.done, r.result = False, None
            if r.last_seen is not None:
                r.last_seen = now  # the wait between calls is not silence
        try:
            for r in self._ranks:
                if r.conn_open and r.process.is_alive():
                    with contextlib.suppress(OSError):
                        r.conn.send(("run", call, fn, args, kwargs or {}))
            return _supervise(self._ranks, self.config, call, on_progress, should_stop)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every rank (asking first, then SIGTERM, SIGKILL) and reap them. Idempotent; bounded in time."""
        if self._closed:
            return
        self._closed = True
        for r in self._ranks:
            if r.conn_open and r.process.is_alive():
                with contextlib.suppress(OSError):
                    r.conn.send(("close",))
        deadline = time.monotonic() + min(self.config.grace_s, 2.0)
        for r in self._ranks:
            r.process.join(timeout=max(0.0, deadline - time.monotonic()))
        _teardown(self._ranks, self.config.grace_s)
        self._store = None

    def __enter__(self) -> Gang:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_BOOTSTRAP = "import sys; from engine.gang import _rank_entry; _rank_entry(int(sys.argv[1]))"


class _RankProcess:
    """One rank's interpreter, started with ``subprocess`` in a session of its own; ``conn`` is the parent's end of
    its socket pair; ``sentinel`` (a pidfd, where Linux has them) becomes readable when it exits."""

    def __init__(self):
        parent_end, child_end = socket.socketpair()
        # The parent's import path, so that the rank finds the modules fn lives in (the worker's cwd included).
        path = [entry or os.getcwd() for entry in sys.path]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        try:
            self._popen = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, str(child_end.fileno())],
                                           pass_fds=(child_end.fileno(),), start_new_session=True, env=env,
                                           stdin=subprocess.DEVNULL)
        finally:
            child_end.close()
        self.pid = self._popen.pid
        self.conn = Connection(parent_end.detach())
        try:
            self.sentinel = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # not Linux 5.3+: exits are found by polling instead
            self.sentinel = None

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def join(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=max(timeout, 0.0))

    def close(self) -> None:
        if self.sentinel is not None:
            with contextlib.suppress(OSError):
                os.close(self.sentinel)
            self.sentinel = None


@dataclass
class _Rank:
    rank: int
    process: Any
    conn: Connection
    started: float
    last_seen: float | None = None
    done: bool = False
    failed: bool = False
    result: Any = None
    conn_open: bool = True


def _supervise(ranks: list[_Rank], config: GangConfig, call: int, on_progress, should_stop) -> Any:
    world = len(ranks)
    stop_sent = False
    failures: list[_Failure] = []
    settle_until = None
    while not all(r.done for r in ranks):
        waitables = [r.conn for r in ranks if r.conn_open] + [r.process.sentinel for r in ranks if not r.failed
                                                                and not r.done and r.process.sentinel is not None]
        ready = wait(waitables, timeout=_POLL_S)
        now = time.monotonic()
        for r in ranks:
            if r.conn_open and r.conn in ready:
                failures += _drain(r, on_progress)
        for r in ranks:
            if not r.done and not r.failed and not r.process.is_alive():
                if r.conn_open:
                    failures += _drain(r, on_progress)  # its last words (a result, an error) may still be there
                if not r.done and not r.failed:
                    r.process.join(timeout=1.0)
                    r.failed = True
                    code = r.process.exitcode
                    failures.append(_Failure(0 if code is not None and code < 0 else 2, time.time(), r.rank,
                                             _exit_text(code)))
        for r in ranks:
            if not r.done and not r.failed and r.last_seen is None and now - r.started > config.startup_timeout_s:
                r.failed = True
                failures.append(_Failure(1, time.time(), r.rank,
                                         f"did not join the process group within {config.startup_timeout_s:g} s"))
        silent = [r for r in ranks if not r.done and not r.failed and r.last_seen is not None
                  and now - r.last_seen > config.silence_timeout_s]
        if silent:
            others = f" (so did rank(s) {', '.join(str(r.rank) for r in silent[1:])}: waiting on it, or hung too)" \
                if silent[1:] else ""
            failures.append(_Failure(1, time.time(), silent[0].rank,
                                     f"sent no heartbeat for {config.silence_timeout_s:g} s (hung){others}"))
            for r in silent:
                r.failed = True
        if failures:
            # One failure brings others (peers lose their connections): gather them briefly, report the cause.
            settle_until = settle_until or now + _SETTLE_S
            if now >= settle_until or all(r.failed or r.done for r in ranks):
                first = min(failures, key=lambda f: (f.priority, f.at))
                raise GangFailed(first.rank, world, first.reason, first.traceback, first.error)
        if should_stop is not None and not stop_sent and should_stop():
            stop_sent = True
            for r in ranks:
                if r.conn_open and not r.done:
                    with contextlib.suppress(OSError):
                        r.conn.send(("stop", call))
    return ranks[0].result


@dataclass(frozen=True)
class _Failure:
    priority: int  # 0: killed by a signal (a cause, never a consequence); 1: raised, hung; 2: exited without a word
    at: float  # wall-clock time of the failure (the rank's own, for an exception)
    rank: int
    reason: str
    traceback: str | None = None
    error: BaseException | None = None


def _drain(r: _Rank, on_progress) -> list[_Failure]:
    """Handle every message waiting from rank ``r``; return the failure it reported, if any."""
    failures = []
    try:
        while r.conn.poll():
            message = r.conn.recv()
            kind = message[0]
            r.last_seen = time.monotonic()
            if kind == "progress" and on_progress is not None:
                on_progress(message[1])
            elif kind == "done":
                r.done, r.result = True, message[2]
            elif kind == "error" and not r.failed:
                r.failed = True
                failures.append(_Failure(1, message[3], r.rank, f"raised {message[1]}", message[2],
                                         _unpickle(message[4])))
    except (EOFError, OSError):
        r.conn_open = False
    return failures


def _exit_text(code: int | None) -> str:
    if code is None:
        return "stopped answering and did not exit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code} without a result"


def _teardown(ranks: list[_Rank], grace_s: float) -> None:
    """Stop every rank's process group: SIGTERM, SIGKILL after ``grace_s``, then reap. Bounded in time."""
    live = [r for r in ranks if r.process.is_alive()]
    for r in live:
        _signal_group(r.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for r in live:
        r.process.join(timeout=max(0.0, deadline - time.monotonic()))
    for r in ranks:
        # Also the groups of ranks that exited: anything they started (a data loader, a shell) goes with them.
        _signal_group(r.process.pid, signal.SIGKILL)
    deadline = time.monotonic() + _REAP_S
    for r in ranks:
        r.process.join(timeout=max(0.1, deadline - time.monotonic()))
        # SIGKILL is delivered asynchronously: wait until the group is gone (its orphans are reaped by init).
        while _group_exists(r.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_exists(r.process.pid):
            logger.error("gang rank %d: processes of its group %d survived SIGKILL", r.rank, r.process.pid)
        if r.process.is_alive():
            logger.error("gang rank %d (pid %d) survived SIGKILL (uninterruptible I/O?)", r.rank, r.process.pid)
        with contextlib.suppress(OSError):
            r.conn.close()
        r.process.close()


def _group_exists(pgid: int | None) -> bool:
    if pgid is None:
        return False
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_group(pid: int | None, sig: int) -> None:
    if pid is None:
        return
    try:
        os.killpg(pid, sig)  # each rank leads its own session: its pgid is its pid
    except ProcessLookupError:
        pass
    except PermissionError:  # not (yet) a group leader: the pid may be reused by now only if we reaped it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


# ------------------------------------------------------------------------------------------------- a rank


def _rank_entry(fd: int) -> None:
    """A rank's interpreter starts here (``_BOOTSTRAP``): its socket to the parent, then who it is."""
    conn = Connection(fd)
    try:
        _, rank, config, store_port, parent_pid = conn.recv()
    except (EOFError, OSError):
        os._exit(1)  # the parent went away before saying
    _rank_main(rank, config, store_port, parent_pid, conn)


def _rank_main(rank: int, config: GangConfig, store_port: int, parent_pid: int, conn: Connection) -> None:
    """The body of one rank's process: join the process group, then run each call the parent sends. The process
    leads its own session (started so): the parent stops it and whatever it started with one killpg."""
    _die_with_parent(parent_pid)
    import torch
    import torch.distributed as dist

    exit_code = 0
    try:
        if config.device_type == "cuda":
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective aborts
            torch.cuda.set_device(rank)
            device, backend = torch.device("cuda", rank), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
            # The ranks share the host's cores: N ranks each using every core would thrash.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.ranks))
        store = dist.TCPStore(_LOOPBACK, store_port, None, False,
                              timeout=datetime.timedelta(seconds=config.startup_timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=config.ranks,
                                timeout=datetime.timedelta(seconds=config.collective_timeout_s))
        context = RankContext(rank, config.ranks, device, conn)
        context.beat()
        while True:
            message = conn.recv()
            if message[0] == "close":
                break
            if message[0] != "run":
                continue  # a stop that came after its call ended
            _, call, fn, args, kwargs = message
            context._begin(call)
            result = fn(context, *args, **kwargs)
            conn.send(("done", call, result if rank == 0 else None))
    except EOFError:
        exit_code = 1  # the parent closed its end: it is going away
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent, which stops the gang
        exit_code = 1
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(), time.time(), _pickled(exc)))
    finally:
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()
        with contextlib.suppress(Exception):
            conn.close()
    os._exit(exit_code)  # no atexit handlers or lingering threads: the parent is waiting for this exit


def _pickled(exc: BaseException) -> bytes | None:
    """``exc`` pickled for the parent, or None when it cannot be (or would not unpickle the same)."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
    except Exception:  # noqa: BLE001 - an exception with an odd constructor: its text and traceback still go
        return None
    return data


def _unpickle(data: bytes | None) -> BaseException | None:
    if data is None:
        return None
    try:
        return pickle.loads(data)
    except Exception:  # noqa: BLE001 - a class the parent cannot import
        return None


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies; check the parent did not die before that."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:  # where prctl is missing (not Linux): poll the parent instead
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()
