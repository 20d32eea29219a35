"""The fault-injection ledger: what each fault test sent and where it ended, as one table per session.

Each test in ``tests/test_faults.py`` records its measured counts here before asserting on them,
so a failing run still shows what was lost or duplicated. ``tests/conftest.py`` prints the
table at the end of the pytest run (``pytest_terminal_summary``) whenever a fault test ran.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pyarrow.parquet as pq

from tasks.lake import read_windows

COLUMNS = (
    "fault",
    "windows sent",
    "windows in lake",
    "duplicates",
    "lost",
    "devices on a broken model",
    "notes",
)


class _Reporter(Protocol):
    """The part of pytest's terminal reporter the summary uses."""

    def write_sep(self, sep: str, title: str) -> None: ...

    def write_line(self, line: str) -> None: ...


@dataclass(frozen=True)
class FaultRecord:
    """One fault scenario's outcome; None where a column does not apply (no windows, no devices)."""

    fault: str
    sent: int | None = None
    in_lake: int | None = None
    duplicates: int | None = None
    lost: int | None = None
    broken_devices: int | None = None
    notes: str = ""

    def cells(self) -> list[str]:
        """The row as table cells ("-" where a column does not apply)."""
        numbers = (self.sent, self.in_lake, self.duplicates, self.lost, self.broken_devices)
        return [self.fault, *("-" if n is None else f"{n:,}" for n in numbers), self.notes]


_RECORDS: list[FaultRecord] = []


def record(entry: FaultRecord) -> FaultRecord:
    """Add one scenario's outcome to this session's table (a re-run of a scenario replaces it)."""
    _RECORDS[:] = [r for r in _RECORDS if r.fault != entry.fault]
    _RECORDS.append(entry)
    return entry


@dataclass(frozen=True)
class LakeTally:
    """Accepted windows against the lake: rows, duplicates, lost ones, and rows nobody sent."""

    rows: int
    duplicates: int
    lost: int
    unexpected: int


def tally_lake(lake_root: Path, fleet: str, sent: Collection[tuple[str, int]]) -> LakeTally:
    """Count the lake's windows of a fleet against the (device, seq) keys that were sent and accepted."""
    windows = read_windows(lake_root, fleet=fleet)
    counts = Counter(zip(windows.device.tolist(), windows.seq.tolist(), strict=True))
    wanted = set(sent)
    return LakeTally(
        rows=len(windows),
        duplicates=sum(n - 1 for n in counts.values()),
        lost=len(wanted - counts.keys()),
        unexpected=len(counts.keys() - wanted),
    )


def unreadable_files(root: Path) -> list[Path]:
    """Visible Parquet files under ``root`` that do not read back in full (a torn or corrupt write)."""
    bad = []
    for path in sorted(root.rglob("*.parquet")):
        if path.name.startswith("."):
            continue
        try:
            pq.read_table(path)
        except Exception:  # any failure to read back is what this looks for
            bad.append(path)
    return bad


def table_lines() -> list[str]:
    """The recorded outcomes as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in _RECORDS]
    return lines


def write_summary(reporter: _Reporter) -> None:
    """Print the table through pytest's terminal reporter; nothing when no fault test ran."""
    if not _RECORDS:
        return
    reporter.write_sep("=", "fault injection summary")
    for line in table_lines():
        reporter.write_line(line)
