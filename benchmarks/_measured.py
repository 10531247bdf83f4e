"""Run one ``fedforget`` command in this process and report what it cost, as JSON.

Usage: ``python benchmarks/_measured.py REPORT.json fedforget-args...``

The report holds the command's wall time, this process's CPU time (user + system, every
thread), its peak resident set size, and the bytes of history blobs it read: every blob read
through ``HistoryStore`` (``fedforget.history.store._read_range``) or served by
``fedforget.history.views.BlobViews`` (BENCHMARK-LOCAL PATCH: both are wrapped to count, for
the run of this process only). Python's own start-up and imports are inside the wall time
(as for a user typing the command); ``imports_seconds`` says how much of it they took.
"""

from __future__ import annotations

import json
import resource
import sys
import time

START = time.perf_counter()


def main() -> int:
    report_path, argv = sys.argv[1], sys.argv[2:]
    counted = {"store_bytes": 0, "store_blobs": 0, "view_bytes": 0, "view_blobs": 0}
    import fedforget.cli
    import fedforget.history.store as store_module
    from fedforget.history.views import BlobViews

    imported = time.perf_counter()
    read_range = store_module._read_range

    def counting_read(location, where):  # type: ignore[no-untyped-def]
        data = read_range(location, where)
        counted["store_bytes"] += len(data)
        counted["store_blobs"] += 1
        return data

    open_blob = BlobViews.open

    def counting_open(self, digest, where):  # type: ignore[no-untyped-def]
        blob = open_blob(self, digest, where)
        counted["view_bytes"] += blob.location.nbytes
        counted["view_blobs"] += 1
        return blob

    store_module._read_range = counting_read  # type: ignore[assignment]
    BlobViews.open = counting_open  # type: ignore[method-assign]
    code = 1
    try:
        code = fedforget.cli.main(argv)
    finally:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        report = {
            "argv": argv,
            "exit_code": code,
            "wall_seconds": time.perf_counter() - START,
            "imports_seconds": imported - START,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_bytes": usage.ru_maxrss * 1024,
            "history_bytes_read": counted["store_bytes"] + counted["view_bytes"],
            **counted,
        }
        with open(report_path, "w") as fh:
            json.dump(report, fh)
    return code


if __name__ == "__main__":
    sys.exit(main())
