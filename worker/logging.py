"""structlog set-up, done once at an edge (CLI, app factory).

Processors redact secrets and PII so that no log line carries a token or a full email/phone.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(token|secret|password|authorization|api_key|access_key)", re.I)
_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
# A value that is a phone number as a whole (`+1 (212) 555-4240`, `2125554240`), and phone
# numbers written in international form inside text (`call +44 20 7946 0958`). Digit runs in
# other text (paths with ids, request ids, timestamps) are left alone.
_WHOLE_PHONE = re.compile(r"\s*\+?[\d\s().-]+\s*")
_INLINE_PHONE = re.compile(r"\+\d[\d\s().-]{6,}\d")
_MIN_PHONE_DIGITS = 7
# Under these keys a bare digit string is a phone number; elsewhere it is an id.
_PHONE_KEYS = re.compile(r"(phone|mobile|sms|msisdn|tel)", re.I)


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def mask_email(value: str) -> str:
    """`jane.doe@example.com` → `j***@example.com`."""
    return _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", value)


def mask_phone(value: str, *, phone_field: bool = False) -> str:
    """Keep only the last two digits of a phone number.

    A whole value counts when it is written like a phone (`+…` or with separators) or sits under
    a phone key; inside other text only the international `+…` form is recognised.
    """
    stripped = value.strip()
    looks_formatted = stripped.startswith("+") or not stripped.isdigit()
    if (
        (phone_field or looks_formatted)
        and _WHOLE_PHONE.fullmatch(value)
        and len(_digits(value)) >= _MIN_PHONE_DIGITS
    ):
        return f"***{_digits(value)[-2:]}"
    return _INLINE_PHONE.sub(lambda m: f"***{_digits(m.group(0))[-2:]}", value)


def _scrub(value: Any, *, phone_field: bool = False) -> Any:
    if isinstance(value, str):
        return mask_phone(mask_email(value), phone_field=phone_field)
    if isinstance(value, dict):
        return {
            k: (
                "[redacted]"
                if _SECRET_KEYS.search(str(k))
                else _scrub(v, phone_field=bool(_PHONE_KEYS.search(str(k))))
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v, phone_field=phone_field) for v in value]
    return value


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Drop secret-looking keys; mask emails and phone numbers in every value and the message."""
    for key in list(event_dict):
        # A request id is ours (or checked by the middleware) and must stay greppable.
        if key == "request_id":
            continue
        if key != "event" and _SECRET_KEYS.search(key):
            event_dict[key] = "[redacted]"
        else:
            event_dict[key] = _scrub(event_dict[key], phone_field=bool(_PHONE_KEYS.search(key)))
    return event_dict


def configure_logging(*, log_format: str = "json", level: str = "INFO") -> None:
    """Configure structlog and the stdlib root logger (uvicorn, alembic) to stderr."""
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        numeric_level = logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        # Tracebacks become text first (ours and the stdlib's, e.g. Celery's "Unrecoverable
        # error"), so that the redaction masks what an exception message quotes.
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_processor,  # before the timestamp, which would otherwise look like a phone number
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # Our request middleware logs each request; uvicorn's access log would duplicate it.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
