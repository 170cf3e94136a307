"""One JSON log formatter for every process, configured once by the CLI."""

from __future__ import annotations

import json
import logging
import sys


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
UNDELIVERED_ANSWER = "ExecuteBatchError raised in core by servicer method"
"""How gRPC's logger begins the record of an answer it could not send."""


class UndeliveredAnswerFilter(logging.Filter):
    """gRPC's ERROR with a traceback for an answer the caller left before it could be sent,
    turned into one DEBUG line.

    A unary handler returns its answer and gRPC sends it afterwards; a caller whose deadline
    passed (or that cancelled) in between is gone, and the send fails in gRPC's core
    (``ExecuteBatchError`` in ``_finish_handler_with_unary_response``), outside any handler,
    so ``rpc_method`` cannot catch it. It is the caller's leaving, not a fault of ours (seen
    1–3 times a run under 2–3× overload), and an error with a traceback per such call would
    bury real errors. Installed on gRPC's core logger (``configure_logging``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._debug = logging.getLogger("inferline.grpc")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not str(record.msg).startswith(UNDELIVERED_ANSWER):
            return True
        method = record.getMessage().removeprefix(UNDELIVERED_ANSWER).strip(" []")
        self._debug.debug("an answer of %s was not delivered: the caller had gone", method)
        return False


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    grpc_core = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, UndeliveredAnswerFilter) for f in grpc_core.filters):
        grpc_core.addFilter(UndeliveredAnswerFilter())
