"""Each table row as soon as it is measured: printed to stderr (flushed) and appended to
<out>/rows.md under its table's header, so that a run cut short (a timeout) keeps what it
measured. The finished tables are still written at the end (report.markdown)."""

from __future__ import annotations

import sys
from pathlib import Path

from . import report
from .distributed import DistResult
from .iteration import IterationResult
from .low_bytes import LowBytesResult
from .step import CaseResult


class RowLog:
    def __init__(self, path: Path, info: dict, command: str):
        self.path = path
        self.headers_written: set[str] = set()
        self.step_peers: list[str] | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"Rows in the order measured by `{command}`\n\n{report.machine_line(info)}\n")

    def _add(self, table: str, header: list[str], row: str) -> None:
        text = ""
        if table not in self.headers_written:
            self.headers_written.add(table)
            text += "\n" + "\n".join(header) + "\n"
        text += row + "\n"
        with self.path.open("a") as f:   # closed at once: the row is on disk before the next measurement
            f.write(text)
        print(text, end="", file=sys.stderr, flush=True)

    def iteration(self, r: IterationResult) -> None:
        self._add("iteration", report.iteration_header(r), report.iteration_row(r))

    def step(self, r: CaseResult) -> None:
        if self.step_peers is None:
            self.step_peers = report.step_peers(r)
        self._add("step", report.step_header(r), report.step_row(r, self.step_peers))

    def clip(self, r: CaseResult) -> None:
        self._add("clip", report.clip_header(r), report.clip_row(r))

    def low_bytes(self, r: LowBytesResult) -> None:
        for row in report.low_bytes_rows(r):   # one layout's variants are measured together
            self._add("low-bytes", report.low_bytes_header(r), row)

    def distributed(self, r: DistResult) -> None:
        self._add("distributed", report.distributed_header(r), report.distributed_row(r))
