"""The JSON log and the filter on gRPC's core logger (``inferline.core.logging``)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest

from inferline.core.logging import GRPC_CORE_LOGGER, JsonFormatter, UndeliveredAnswerFilter, configure_logging


def _grpc_error(message: str, *args: object) -> logging.LogRecord:
    """An ERROR of gRPC's core logger with a traceback, as gRPC writes it."""
    try:
        raise RuntimeError('Failed "execute_batch"')
    except RuntimeError:
        exc_info = sys.exc_info()
    return logging.LogRecord(GRPC_CORE_LOGGER, logging.ERROR, "server.pyx.pxi", 710, message, args, exc_info)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """What reaches the root logger's handlers once ``configure_logging("DEBUG")`` is in place."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("DEBUG")
    collected = _Records()
    root.handlers[:] = [collected]
    yield collected.records
    root.handlers[:] = handlers
    root.setLevel(level)


def test_an_answer_the_caller_left_is_one_debug_line_without_a_traceback(records: list[logging.LogRecord]) -> None:
    core = logging.getLogger(GRPC_CORE_LOGGER)
    method = "/inferline.v1.Inference/Predict"
    core.handle(_grpc_error("ExecuteBatchError raised in core by servicer method [%s]", method))
    core.handle(_grpc_error("Unexpected [%s] raised by servicer method [%s]", "ValueError", "/x.Y/Z"))
    assert [(r.levelname, r.name, r.getMessage()) for r in records] == [
        ("DEBUG", "inferline.grpc", f"an answer of {method} was not delivered: the caller had gone"),
        ("ERROR", GRPC_CORE_LOGGER, "Unexpected [ValueError] raised by servicer method [/x.Y/Z]"),
    ]
    assert records[0].exc_info is None and records[1].exc_info is not None  # a real error keeps its traceback
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["level"] == "DEBUG" and "exc" not in line


def test_the_filter_passes_every_other_record() -> None:
    undelivered = UndeliveredAnswerFilter()
    assert not undelivered.filter(_grpc_error("ExecuteBatchError raised in core by servicer method [%s]", "/a/B"))
    assert undelivered.filter(_grpc_error("Unexpected [%s] raised by servicer method [%s]", "ValueError", "/a/B"))
    warning = _grpc_error("ExecuteBatchError raised in core by servicer method [%s]", "/a/B")
    warning.levelno = logging.WARNING
    assert undelivered.filter(warning)  # only the ERROR with its traceback is replaced


def test_configuring_twice_installs_one_filter() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO")
        configure_logging("INFO")
        filters = logging.getLogger(GRPC_CORE_LOGGER).filters
        assert sum(isinstance(f, UndeliveredAnswerFilter) for f in filters) == 1
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
