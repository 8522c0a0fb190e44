"""``SchedulerFleet``: start, watch and stop reference schedulers as local subprocesses.

Used by ``loadsnap demo``, the controller CLI (``--spawn``), tests and benchmarks.

Theory of operation. A fleet owns its instance for its whole life:

* **Deployment lock.** Before anything starts, :func:`claim_instance` takes
  ``loadsnap-<instance>.fleet.lock`` next to the segment (:func:`deployment_lock_path`; an
  ``flock``, so the kernel drops it however its holders die). A second deployment of the same
  instance fails at once with :class:`InstanceRunningError`, before it spawns or removes
  anything. The schedulers inherit the locked descriptor, so the lock stays held until the
  fleet *and* every one of its schedulers are gone: a new deployment cannot start next to the
  schedulers of a killed one that are still shutting down.
* **Reclaim.** Holding the lock means every earlier deployment of the instance is dead, so what
  one left is ours: its ipc directory is removed and made anew, its segment is reused in place
  by our schedulers (which bump their epochs), a collector lock file is taken over by the next
  collector.
* **ipc directory** ``$TMPDIR/loadsnap-<instance>-<uid>.ipc`` (:func:`ipc_dir_path`, mode 0700;
  a symlink or another user's directory there is refused) holds the ZMQ endpoints and, without
  ``log_dir``, each rank's stdout and stderr (``scheduler-R.log``). When a rank exits, the last
  line it printed is quoted in the error: a scheduler prints one line for a startup failure.
* **Children die with the fleet.** Each scheduler gets ``LOADSNAP_PARENT_PID`` and sets
  ``PR_SET_PDEATHSIG`` (SIGTERM) itself (:mod:`scheduler.lifeline`), so a fleet killed with
  SIGKILL or by the OOM killer takes its schedulers with it, and they still close cleanly (the
  last writer unlinks the segment). The kernel sends that signal when the *thread* that spawned
  a child exits: create the fleet on the main thread (or one that lives as long as the
  process). Linux only; elsewhere children outlive a killed fleet.
* :meth:`SchedulerFleet.close` stops its own schedulers (SIGCONT, SIGTERM, then SIGKILL after
  a timeout), removes the segment if one of them died without closing its writer (never one
  that another process still writes: ``unlink_segment`` refuses it, and it is left alone),
  removes the ipc directory and releases the deployment lock, removing its file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from loadsnap import segment_path, unlink_segment
from loadsnap._lockfile import LockFile, LockHeldError
from loadsnap.errors import (
    LoadsnapError,
    SegmentError,
    SegmentUnavailableError,
    TransportError,
    UsageError,
)
from loadsnap.reading import SlotStatus
from loadsnap.shm_reader import ShmReader
from scheduler.lifeline import child_env

__all__ = [
    "InstanceRunningError",
    "SchedulerFleet",
    "claim_instance",
    "deployment_lock_path",
    "ipc_dir_path",
]

STOP_TIMEOUT_S: Final[float] = 5.0
_IPC_PATH_MAX: Final[int] = 107  # sockaddr_un.sun_path is 108 bytes with the final NUL
_TAIL_BYTES: Final[int] = 4096
_LINE_MAX: Final[int] = 500


class InstanceRunningError(LockHeldError):
    """Another live deployment holds the instance's deployment lock."""


def deployment_lock_path(instance: str) -> str:
    """The deployment lock of ``instance``: next to its segment (temp dir without /dev/shm)."""
    directory = os.path.dirname(segment_path(instance))
    if not os.path.isdir(directory):
        directory = tempfile.gettempdir()
    return os.path.join(directory, f"loadsnap-{instance}.fleet.lock")


def ipc_dir_path(instance: str) -> str:
    """The directory of ``instance``'s ZMQ ``ipc://`` endpoints, for this user."""
    segment_path(instance)  # validates the name
    name = f"loadsnap-{instance}-{os.geteuid()}.ipc"
    return os.path.join(tempfile.gettempdir(), name)


def claim_instance(instance: str) -> LockFile:
    """Take ``instance``'s deployment lock, without waiting. Hand it to a :class:`SchedulerFleet`.

    Raises
    ------
    InstanceRunningError
        Another deployment of ``instance`` (or one of its schedulers) is still alive.
    SegmentError
        The lock file cannot be used (the message says why).
    """
    lock = LockFile(deployment_lock_path(instance), "deployment lock")
    try:
        lock.acquire(0)
    except LockHeldError:
        raise InstanceRunningError(
            f"instance {instance} is already running (lock={lock.path})"
        ) from None
    return lock


class SchedulerFleet:
    """``dp_size`` reference schedulers of one instance. Single owner; not thread-safe; create
    it on the main thread (its schedulers die when the thread that spawned them exits).

    Parameters
    ----------
    instance:
        Deployment instance name (also names the shm segment).
    dp_size:
        Number of schedulers.
    extra_args:
        More ``python -m scheduler`` flags for every rank (e.g. cost model).
    log_dir:
        Where each rank writes ``scheduler-R.log`` (default: the ipc directory, removed by
        :meth:`close`).
    lock:
        The instance's deployment lock, already taken with :func:`claim_instance` (when
        something must start before the schedulers); the fleet releases it. Default: taken here.

    Raises
    ------
    InstanceRunningError
        Another deployment of ``instance`` is alive.
    TransportError
        The ipc directory cannot be used (the message says why).
    OSError
        ``log_dir`` cannot take the log files, or the interpreter cannot be started.
    """

    def __init__(
        self,
        instance: str,
        dp_size: int,
        extra_args: Sequence[str] = (),
        *,
        log_dir: str | None = None,
        lock: LockFile | None = None,
    ) -> None:
        if dp_size < 1:
            raise UsageError(f"dp_size must be >= 1: dp_size={dp_size}")
        self.instance = instance
        self.dp_size = dp_size
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ipc_dir = ipc_dir_path(instance)
        self._lock = lock if lock is not None else claim_instance(instance)
        self._ipc_made = False
        self._closed = False
        try:
            _make_private_dir(self.ipc_dir)
            self._ipc_made = True
            self.request_addrs = [f"ipc://{self.ipc_dir}/req-{rank}" for rank in range(dp_size)]
            self.result_addr = f"ipc://{self.ipc_dir}/results"
            longest = max(len(a) for a in [*self.request_addrs, self.result_addr]) - len("ipc://")
            if longest > _IPC_PATH_MAX:
                raise TransportError(
                    f"ipc endpoint path too long: length={longest} max={_IPC_PATH_MAX} "
                    f"(ipc_dir={self.ipc_dir}); set TMPDIR to a shorter directory"
                )
            log_base = self.ipc_dir if log_dir is None else log_dir
            self.log_paths = [
                os.path.join(log_base, f"scheduler-{rank}.log") for rank in range(dp_size)
            ]
            self._log_kept = log_dir is not None
            self._epochs_before = _slot_epochs(instance, dp_size)
            env = child_env()  # the schedulers die with this process (scheduler.lifeline)
            for rank in range(dp_size):
                cmd = [
                    sys.executable,
                    "-m",
                    "scheduler",
                    "--instance",
                    instance,
                    "--dp-size",
                    str(dp_size),
                    "--dp-rank",
                    str(rank),
                    "--request-addr",
                    self.request_addrs[rank],
                    "--result-addr",
                    self.result_addr,
                    *extra_args,
                ]
                with open(self.log_paths[rank], "wb") as log:
                    proc = subprocess.Popen(
                        cmd,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        # Each scheduler holds the deployment lock with us (see the module).
                        pass_fds=(self._lock.fileno(),),
                    )
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise

    def exited(self) -> dict[int, str]:
        """Every rank whose scheduler has exited, with why: exit status and its last line."""
        return {
            rank: self._exit_message(rank, proc.returncode)
            for rank, proc in enumerate(self.procs)
            if proc.poll() is not None
        }

    def check(self) -> None:
        """Raise if any scheduler has exited.

        Raises
        ------
        TransportError
            The first rank that exited, with its exit status and the last line it printed.
        """
        exited = self.exited()
        if exited:
            raise TransportError(exited[min(exited)])

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Wait until every rank has published a fresh record from this fleet's scheduler.

        A record counts once its slot's epoch differs from the one the slot had before the
        schedulers started (each new writer bumps it): a fresh record of another process that
        writes the same rank is not taken for ours.

        Raises
        ------
        TransportError
            A scheduler exited (the message quotes the last line it printed), or not every
            rank was fresh within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        with ShmReader(self.instance) as reader:
            while True:
                self.check()
                try:
                    table = reader.hot_table()
                except SegmentUnavailableError:
                    pass
                else:
                    ready = table.status == SlotStatus.FRESH
                    if self._epochs_before is not None and len(ready) == self.dp_size:
                        ready &= table.epoch != self._epochs_before
                    if len(ready) == self.dp_size and bool(ready.all()):
                        return
                if time.monotonic() > deadline:
                    raise TransportError(
                        f"schedulers not ready within timeout_s={timeout_s} "
                        f"(segment={reader.segment_path})"
                    )
                time.sleep(0.02)

    def pause_process(self, rank: int) -> None:
        """SIGSTOP one scheduler (to simulate a hang)."""
        self.procs[rank].send_signal(signal.SIGSTOP)

    def resume_process(self, rank: int) -> None:
        """SIGCONT one scheduler."""
        self.procs[rank].send_signal(signal.SIGCONT)

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every scheduler (SIGTERM, then SIGKILL), clean up after them. Idempotent.

        Removes the segment only if a scheduler died without closing its writer, and never
        while another process still writes it; removes the ipc directory; releases and
        removes the deployment lock.
        """
        if self._closed:
            return
        self._closed = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        unreaped = False
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:  # e.g. stuck in the kernel: it holds the lock
                    unreaped = True
        died_uncleanly = any(p.returncode is not None and p.returncode < 0 for p in self.procs)
        self.procs = []
        if died_uncleanly:
            # A scheduler killed by a signal could not unlink the segment as the last writer.
            with contextlib.suppress(SegmentError):  # another process's live writer: leave it
                unlink_segment(self.instance)
        if self._ipc_made:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
        # An unreaped scheduler still holds the lock through its descriptor: keep the file, so
        # that no new deployment locks a fresh one next to it.
        self._lock.release(remove=not unreaped)

    def _exit_message(self, rank: int, returncode: int) -> str:
        if returncode < 0:
            try:
                status = f"signal={signal.Signals(-returncode).name}"
            except ValueError:
                status = f"signal={-returncode}"
        else:
            status = f"rc={returncode}"
        line = _last_line(self.log_paths[rank])
        where = f" (log={self.log_paths[rank]})" if self._log_kept else ""
        return f"scheduler dp_rank={rank} exited {status}: {line or '(no output)'}{where}"

    def __enter__(self) -> SchedulerFleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _slot_epochs(instance: str, dp_size: int) -> npt.NDArray[np.uint64] | None:
    """Every slot's epoch now, or None without a readable segment of ``dp_size`` ranks."""
    with ShmReader(instance) as reader:
        try:
            table = reader.hot_table()
        except LoadsnapError:  # missing, not ready, another layout: no record can be mistaken
            return None
    return table.epoch.copy() if len(table.epoch) == dp_size else None


def _make_private_dir(path: str) -> None:
    """Create ``path`` 0700; a leftover of ours is removed first (call under the lock)."""
    try:
        try:
            os.mkdir(path, 0o700)
            return
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):  # a symlink, even to a directory, is refused too
            raise TransportError(
                f"ipc directory path is not a directory (ipc_dir={path}); remove it"
            )
        if st.st_uid != os.geteuid():
            raise TransportError(
                f"ipc directory belongs to uid={st.st_uid}, not uid={os.geteuid()} "
                f"(ipc_dir={path}); remove it or set TMPDIR"
            )
        shutil.rmtree(path)  # a dead deployment's: we hold the instance's deployment lock
        os.mkdir(path, 0o700)
    except OSError as exc:
        raise TransportError(f"cannot make ipc directory: {exc.strerror} (ipc_dir={path})") from exc


def _last_line(path: str) -> str:
    """The last non-empty line of the file at ``path`` (its tail only), or ``""``."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - _TAIL_BYTES))
            tail = f.read()
    except OSError:
        return ""
    for line in reversed(tail.decode("utf-8", "replace").splitlines()):
        if line.strip():
            return line.strip()[:_LINE_MAX]
    return ""
