"""Progress of a job: a rich progress bar (rows/s, ETA) on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

logger = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
"""Without a terminal: one progress line this often (a Kubernetes log stays readable)."""


class JobProgress:
    """Counts rows as chunks commit; shows them as a bar on a TTY, or logs them now and then."""

    def __init__(self, total_rows: int | None, already_rows: int, *, interactive: bool | None = None) -> None:
        self.rows = 0
        self.errors = 0
        self._total = total_rows
        self._already = already_rows
        self._started = time.monotonic()
        self._last_log = self._started
        use_bar = sys.stderr.isatty() if interactive is None else interactive
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if use_bar:
            self._bar = Progress(
                TextColumn("[bold]batch"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )

    def __enter__(self) -> JobProgress:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task("rows", total=self._total, completed=self._already, rate="-")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    @property
    def rows_per_s(self) -> float:
        elapsed = self.elapsed_s
        return (self.rows + self.errors) / elapsed if elapsed > 0 else 0.0

    def advance(self, rows: int, errors: int) -> None:
        self.rows += rows
        self.errors += errors
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=rows + errors, rate=f"{self.rows_per_s:,.0f}")
            return
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            done = self._already + self.rows + self.errors
            of = f"/{self._total}" if self._total is not None else ""
            logger.info("batch: %d%s rows done, %d errors, %.0f rows/s", done, of, self.errors, self.rows_per_s)
