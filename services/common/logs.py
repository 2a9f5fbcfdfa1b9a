"""JSON logs through structlog, with the request id bound per RPC (contextvars).

Every line of the process is one JSON object: structlog's own, and those of libraries that log
through the standard library (uvicorn, grpc, aetcd, the OpenTelemetry SDK), rendered by the same
processors. Each carries `service`, `logger`, `level`, `timestamp`, the bound `request_id` and
`tenant` when there are, and `trace_id`/`span_id` when a span is current (telemetry.py).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from services.common.telemetry import add_trace_ids


def configure_logging(service: str, level: str = "info") -> None:
    """One JSON object per line on stderr; `request_id` appears once an RPC binds it."""
    def add_service(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)  # threads see no contextvars: added to every line
        return event

    shared = [
        structlog.stdlib.add_logger_name,
        structlog.contextvars.merge_contextvars,
        add_service,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_NamedPrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


class _NamedPrintLogger(structlog.PrintLogger):
    """structlog's fast print logger, with the name `add_logger_name` reads."""

    def __init__(self, file: Any, name: str):
        super().__init__(file)
        self.name = name


class _NamedPrintLoggerFactory:
    def __init__(self, file: Any):
        self._file = file

    def __call__(self, *args: Any) -> _NamedPrintLogger:
        return _NamedPrintLogger(self._file, str(args[0]) if args else "")


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
