"""worker/logging.py: secrets and PII never reach a log line; JSON lines carry the request id.

`structlog.testing.capture_logs` replaces the processor chain, so it can't see redaction: these
tests call `redact_processor` directly, or configure the real chain and read what it wrote.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from worker.logging import configure_logging, mask_email, mask_phone, redact_processor

# --- the processor ------------------------------------------------------------------------------


def _redact(**fields: Any) -> dict[str, Any]:
    return dict(redact_processor(None, "info", {"event": "something.happened", **fields}))


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "api_token",
        "access_token",
        "TOKEN",
        "secret",
        "client_secret",
        "webhook_secret",
        "password",
        "db_password",
        "authorization",
        "Authorization",
        "api_key",
        "access_key",
    ],
)
def test_secret_looking_keys_are_redacted(key: str) -> None:
    out = _redact(**{key: "lsk_abcdef0123456789"})
    assert out[key] == "[redacted]"


def test_secrets_in_nested_values_are_redacted() -> None:
    out = _redact(
        headers={"Authorization": "Bearer lsk_abc", "Content-Type": "application/json"},
        config={"shopify": {"access_token": "shpat_123", "shop": "demo"}},
        deliveries=[{"token": "t1", "id": 1}, {"token": "t2", "id": 2}],
    )
    assert out["headers"] == {"Authorization": "[redacted]", "Content-Type": "application/json"}
    assert out["config"] == {"shopify": {"access_token": "[redacted]", "shop": "demo"}}
    assert out["deliveries"] == [{"token": "[redacted]", "id": 1}, {"token": "[redacted]", "id": 2}]
    assert "lsk_abc" not in json.dumps(out)
    assert "shpat_123" not in json.dumps(out)


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("jane@example.com", "j***@example.com"),
        ("Jane.Doe+tag@Example.co.uk", "J***@Example.co.uk"),
        ("write to jane@example.com today", "write to j***@example.com today"),
        ("a@x.io, b@y.org", "a***@x.io, b***@y.org"),
        ("no email here", "no email here"),
    ],
)
def test_mask_email(raw: str, masked: str) -> None:
    assert mask_email(raw) == masked


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("+12125554240", "***40"),
        ("+1 (212) 555-4240", "***40"),
        ("(212) 555-4240", "***40"),
        ("212.555.4241", "***41"),
        ("call +44 20 7946 0958 now", "call ***58 now"),
        ("order 42", "order 42"),
        # Ids in paths and other digit runs inside text are not phone numbers.
        ("/api/v1/accounts/1/customers/123456789", "/api/v1/accounts/1/customers/123456789"),
        ("2026-11-22T03:44:57.123456Z", "2026-11-22T03:44:57.123456Z"),
    ],
)
def test_mask_phone(raw: str, masked: str) -> None:
    assert mask_phone(raw) == masked


def test_processor_masks_pii_in_every_value() -> None:
    out = _redact(
        email="jane.doe@example.com",
        phone="+1 (212) 555-4240",
        customer={"email": "JOHN@corp.org", "phone": "+12125554241", "first_name": "John"},
        recipients=["a@x.io", "+12125554242"],
        count=3,
        ratio=0.5,
        flag=True,
        nothing=None,
    )
    assert out["email"] == "j***@example.com"
    assert out["phone"] == "***40"
    assert out["customer"] == {"email": "J***@corp.org", "phone": "***41", "first_name": "John"}
    assert out["recipients"] == ["a***@x.io", "***42"]
    assert (out["count"], out["ratio"], out["flag"], out["nothing"]) == (3, 0.5, True, None)
    text = json.dumps(out)
    for leak in ("jane.doe@", "2125554240", "555-4240", "JOHN@", "2125554241"):
        assert leak not in text
    assert out["event"] == "something.happened"


def test_bare_digits_are_a_phone_only_under_a_phone_key() -> None:
    out = _redact(phone="2125554240", sms_to=["2125554241"], external_id="207119551")
    assert out["phone"] == "***40"
    assert out["sms_to"] == ["***41"]
    assert out["external_id"] == "207119551"


def test_the_message_itself_is_scrubbed() -> None:
    out = _redact(event="sending links to jane@example.com and +1 212 555 4240")
    assert out["event"] == "sending links to j***@example.com and ***40"


def test_request_ids_are_kept_intact() -> None:
    # uuid4().hex often holds runs of 8+ digits, which look like a phone number.
    request_id = "3f2b8c1e12345678aabbccddeeff0011"
    assert _redact(request_id=request_id)["request_id"] == request_id


# --- the configured chain -----------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_config = structlog.get_config()
    yield
    structlog.reset_defaults()
    structlog.configure(**saved_config)
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_the_request_id_and_no_pii(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(log_format="json", level="INFO")
    log = structlog.get_logger("test")
    request_id = "3f2b8c1e12345678aabbccddeeff0011"
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        log.info(
            "customer.created",
            customer_id=7,
            email="jane.doe@example.com",
            phone="+1 (212) 555-4240",
            api_token="lsk_supersecret",
        )
    log.info("after.request")
    log.debug("hidden.below.level")
    records = _json_lines(capsys.readouterr().err)
    assert [r["event"] for r in records] == ["customer.created", "after.request"]
    first, second = records
    assert first["request_id"] == request_id
    assert "request_id" not in second  # unbound when the request ends
    assert first["level"] == "info"
    assert first["customer_id"] == 7
    assert first["email"] == "j***@example.com"
    assert first["phone"] == "***40"
    assert first["api_token"] == "[redacted]"
    # The timestamp is an ISO-8601 UTC time, not mangled by the phone masking.
    assert first["timestamp"].endswith("Z")
    assert first["timestamp"][:4].isdigit()
    assert first["timestamp"][10] == "T"


@pytest.mark.usefixtures("restore_logging")
def test_stdlib_records_go_through_the_same_redaction(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(log_format="json", level="INFO")
    with structlog.contextvars.bound_contextvars(request_id="req-1"):
        logging.getLogger("some.library").warning(
            "delivery failed", extra={"to": "jane@example.com", "password": "hunter2"}
        )
    records = _json_lines(capsys.readouterr().err)
    assert len(records) == 1
    record = records[0]
    assert record["event"] == "delivery failed"
    assert record["request_id"] == "req-1"
    assert record["level"] == "warning"
    text = json.dumps(record)
    assert "jane@example.com" not in text
    assert "hunter2" not in text


@pytest.mark.usefixtures("restore_logging")
def test_tracebacks_are_rendered_as_text_and_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """A library's `logger.exception` (Celery's "Unrecoverable error") and ours carry the
    traceback as text under `exception`, with what the exception message quotes masked."""
    configure_logging(log_format="json", level="INFO")

    def fail() -> None:
        raise ValueError("duplicate key (email)=(jane@example.com)")

    for logger in (logging.getLogger("celery.worker"), structlog.get_logger("ours")):
        try:
            fail()
        except ValueError:
            logger.exception("Unrecoverable error")
    records = _json_lines(capsys.readouterr().err)
    assert len(records) == 2
    for record in records:
        assert "exc_info" not in record
        assert "Traceback (most recent call last)" in record["exception"]
        assert "in fail" in record["exception"]
        assert "j***@example.com" in record["exception"]
        assert "jane@example.com" not in json.dumps(record)


@pytest.mark.usefixtures("restore_logging")
def test_console_format_also_redacts(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(log_format="console", level="INFO")
    structlog.get_logger("test").info("card.links", email="jane@example.com", token="lsk_x")
    err = capsys.readouterr().err
    assert "card.links" in err
    assert "j***@example.com" in err
    assert "jane@example.com" not in err
    assert "lsk_x" not in err
