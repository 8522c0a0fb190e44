"""``SchedulerFleet``: start, watch and stop reference schedulers as local subprocesses.

Used by the controller CLI (``--spawn``), the integration test and the benchmark. Every
endpoint is ``ipc://`` in a private temporary directory; :meth:`SchedulerFleet.close` kills
whatever is left (SIGCONT first, so a stopped process can die) and removes the segment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from loadsnap._segment import unlink_segment
from loadsnap.errors import TransportError, UsageError
from loadsnap.reading import SlotStatus
from loadsnap.shm_reader import SegmentUnavailableError, ShmReader

__all__ = ["SchedulerFleet"]


class SchedulerFleet:
    """``dp_size`` reference schedulers of one instance. Single owner; not thread-safe.

    Parameters
    ----------
    instance:
        Deployment instance name (also names the shm segment).
    dp_size:
        Number of schedulers.
    extra_args:
        More ``python -m scheduler`` flags for every rank (e.g. cost model).
    log_dir:
        Where each rank writes ``scheduler-R.log`` (default: discarded).
    """

    def __init__(
        self,
        instance: str,
        dp_size: int,
        extra_args: Sequence[str] = (),
        *,
        log_dir: str | None = None,
    ) -> None:
        if dp_size < 1:
            raise UsageError(f"dp_size must be >= 1: dp_size={dp_size}")
        self.instance = instance
        self.dp_size = dp_size
        self._tmp = tempfile.TemporaryDirectory(prefix="dpc-")
        base = self._tmp.name
        self.request_addrs = [f"ipc://{base}/req-{rank}" for rank in range(dp_size)]
        self.result_addr = f"ipc://{base}/results"
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
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
                if log_dir is not None:
                    with open(os.path.join(log_dir, f"scheduler-{rank}.log"), "wb") as log:
                        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                else:
                    proc = subprocess.Popen(
                        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Wait until every rank has published a fresh record.

        Raises
        ------
        TransportError
            A scheduler exited, or not every rank was fresh within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        with ShmReader(self.instance) as reader:
            while True:
                for rank, proc in enumerate(self.procs):
                    if proc.poll() is not None:
                        raise TransportError(
                            f"scheduler exited: dp_rank={rank} rc={proc.returncode} "
                            f"(segment={reader.segment_path})"
                        )
                try:
                    table = reader.hot_table()
                    if bool((table.status == SlotStatus.FRESH).all()):
                        return
                except SegmentUnavailableError:
                    pass
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

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop every scheduler (SIGTERM, then SIGKILL), remove the segment. Idempotent."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        self.procs = []
        unlink_segment(self.instance)
        self._tmp.cleanup()

    def __enter__(self) -> SchedulerFleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
