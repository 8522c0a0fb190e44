"""The torn-read detector of ``tests.test_torn_reads`` on the readers' numpy paths.

At dp 2 a reader parses the control table and reads moved ranks in plain Python; large
deployments use numpy (the control table as a structured array, moved ranks gathered as rows
and checked with one CRC call per batch). Here readers are forced onto those paths while the
writers publish at full speed, with the batch check and with each record checked alone; they
must accept no tear. The detector's control run (that it sees tears when the protocol is
bypassed) is ``tests.test_torn_reads::test_control_run_without_the_protocol_sees_tears``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from loadsnap import ShmReader, SlotStatus
from tests.test_torn_reads import (
    _finish_writers,
    _result,
    _running_writers,
    _snapshot_tear,
    _stop,
    _table_tears,
)

_ROOT = Path(__file__).resolve().parent.parent.parent
_DURATION_S = 2.5


def reader_main(instance: str, duration_s: float, verify_each: bool) -> None:
    """Read through every path with numpy forced; report accepted tears."""
    counts = {"reads": 0, "accepted": 0, "tears": 0, "invalid": 0, "torn": 0, "tables": 0}
    seqs: set[int] = set()
    with ShmReader(instance, verify_each=verify_each) as reader:
        reader._small_max = reader._gather_min = 0  # numpy control table, gathers
        deadline = time.monotonic() + duration_s
        turn = 0
        while time.monotonic() < deadline:
            turn += 1
            if turn % 4 == 3:
                table = reader.hot_table()
                counts["tables"] += 1
                counts["tears"] += _table_tears(table)
                counts["torn"] += int((table.status == SlotStatus.TORN).sum())
                seqs.update(table.seq[table.valid].tolist())
                continue
            if turn % 4 == 0:
                reads = reader.read_all()
            elif turn % 4 == 1:
                reads = reader.read_changed()
            else:
                reads = [reader.read(0), reader.read(1)]
            for read in reads:
                counts["reads"] += 1
                if read.status is SlotStatus.INVALID:
                    counts["invalid"] += 1
                elif read.status is SlotStatus.TORN:
                    counts["torn"] += 1
                elif read.snapshot is not None:
                    counts["accepted"] += 1
                    counts["tears"] += _snapshot_tear(read.snapshot, read.seq)
                    seqs.add(read.seq)
        counts["crc_rejects"] = reader.stats.crc_rejects
        counts["retries"] = reader.stats.retries
    counts["distinct_seqs"] = len(seqs)
    print(json.dumps(counts), flush=True)


def test_numpy_paths_accept_no_tears(instance: str) -> None:
    code = (
        "import sys; from tests.process.test_torn_reads_vectorised import reader_main; "
        "reader_main(sys.argv[1], float(sys.argv[2]), sys.argv[3] == '1')"
    )
    with ExitStack() as stack:
        writers = _running_writers(stack, instance)
        readers = [
            subprocess.Popen(
                [sys.executable, "-c", code, instance, str(_DURATION_S), flag],
                cwd=_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for flag in ("0", "1")
        ]
        for proc in readers:
            stack.callback(_stop, proc)
        results = [_result(proc) for proc in readers]
        published = _finish_writers(writers)
    assert all(count > 1000 for count in published), published
    for result in results:
        assert result["tears"] == 0, result
        assert result["invalid"] == 0, result
        assert result["accepted"] > 0 and result["tables"] > 0, result
        assert result["distinct_seqs"] > 10, result
