"""Outbox delivery (models/outbox.py + worker/outbox.py) on SQLite and PostgreSQL.

Email goes to a real SMTP server (aiosmtpd on 127.0.0.1); SMS, the pass service, Shopify and
Square are in-process fakes behind one `httpx.MockTransport`.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session
from structlog.testing import capture_logs

from models import outbox
from models.cards import add_stamps
from models.db import make_sessionmaker
from models.tables import Connection, CustomerCard, OutboxMessage, WebhookEvent
from tests.fakes.pass_service import SECRET as PASS_SECRET
from tests.fakes.pass_service import FakePassService
from tests.fakes.shopify import API_VERSION, TOKEN, FakeShopify
from tests.fakes.sms import TOKEN as SMS_TOKEN
from tests.fakes.sms import FakeSms
from tests.fakes.smtp import FakeSmtp
from tests.fakes.square import DEFAULT_TOKEN, FakeSquare
from tests.fakes.tls import LocalAuthority
from tests.outbox_helpers import (
    MERCHANT,
    PASS_URL,
    SHOP,
    SHOPIFY_BASE,
    SMS_URL,
    SQUARE_BASE,
    T0,
    WALLET,
    add_customer_with_card,
    channel_states,
    connect_source,
    make_settings,
    outbox_total,
    router,
    row,
)
from worker.outbox import build_card_email, deliver_due, parse_smtp_url, sign_pass_request

LATER = dt.timedelta(days=1)


@pytest.fixture
def key() -> bytes:
    return Fernet.generate_key()


@pytest.fixture
def smtp() -> Iterator[tuple[FakeSmtp, str]]:
    fake = FakeSmtp()
    with fake.serve() as url:
        yield fake, url


@pytest.fixture
def fakes() -> dict[str, Any]:
    shopify = FakeShopify()
    square = FakeSquare()
    sms = FakeSms()
    passes = FakePassService()
    transport = router(
        {
            "fake-shopify.test": shopify.handle,
            "fake-square.test": square.handle,
            "fake-sms.test": sms.handle,
            "fake-pass.test": passes.handle,
        }
    )
    return {
        "shopify": shopify,
        "square": square,
        "sms": sms,
        "pass": passes,
        "transport": transport,
    }


@pytest.fixture
def store(make_store: Callable[..., tuple[int, str]]) -> int:
    store_id, _ = make_store(name="Bean There")
    return store_id


def full_settings(db_url: str, smtp_url: str, **overrides: Any) -> Any:
    values = {
        "SMTP_URL": smtp_url,
        "SMS_API_URL": SMS_URL,
        "SMS_API_TOKEN": SMS_TOKEN,
        "SMS_FROM": "+15550000000",
        "PASS_SERVICE_URL": PASS_URL,
        "PASS_SERVICE_SECRET": PASS_SECRET,
        **overrides,
    }
    return make_settings(db_url, **values)


def deliver(engine: Engine, settings: Any, key: bytes, fakes: dict[str, Any], **kw: Any) -> Any:
    return deliver_due(
        make_sessionmaker(engine),
        settings=settings,
        key=key,
        transport=fakes["transport"],
        sleep=lambda _s: None,
        **kw,
    )


# --- builders ---------------------------------------------------------------------------------


def test_parse_smtp_url() -> None:
    plain = parse_smtp_url("smtp://127.0.0.1:2525")
    assert (plain.host, plain.port, plain.security, plain.username) == (
        "127.0.0.1",
        2525,
        "plain",
        None,
    )
    tls = parse_smtp_url("smtp://us%40er:p%3Ass@mail.example.com?starttls=true")
    assert (tls.port, tls.security, tls.username, tls.password) == (
        587,
        "starttls",
        "us@er",
        "p:ss",
    )
    assert parse_smtp_url("smtps://mail.example.com").port == 465
    assert parse_smtp_url("smtps://mail.example.com").security == "ssl"
    with pytest.raises(ValueError, match="smtp://"):
        parse_smtp_url("http://mail.example.com")
    with pytest.raises(ValueError, match="no host"):
        parse_smtp_url("smtp://")


def test_email_holds_both_urls_in_text_and_html() -> None:
    message = build_card_email(
        sender="Loyalty <cards@shop.example.com>",
        recipient="ada@example.com",
        first_name="Ada",
        store_name="Bean <There>",
        card_name="Coffee Club",
        apple_wallet_url="https://w.example/passes/t/apple",
        google_wallet_url="https://w.example/passes/t/google",
        idempotency_key="card_links:1:abc",
    )
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None
    assert html is not None
    for part in (text.get_content(), html.get_content()):
        assert "https://w.example/passes/t/apple" in part
        assert "https://w.example/passes/t/google" in part
    assert "Bean &lt;There&gt;" in html.get_content()
    assert message["Message-ID"].endswith("@shop.example.com>")
    again = build_card_email(
        sender="cards@shop.example.com",
        recipient="x@example.com",
        first_name=None,
        store_name="s",
        card_name="c",
        apple_wallet_url="a",
        google_wallet_url="g",
        idempotency_key="card_links:1:abc",
    )
    assert again["Message-ID"] == message["Message-ID"]  # stable per delivery


# --- card links: email + SMS ----------------------------------------------------------------


def test_card_links_email_and_sms(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    smtp: tuple[FakeSmtp, str],
    fakes: dict[str, Any],
) -> None:
    fake_smtp, url = smtp
    settings = full_settings(db_url, url)
    _customer_id, row_id = add_customer_with_card(
        engine, store, email="ada@example.com", phone="+14155550123"
    )
    assert deliver(engine, settings, key, fakes) == {
        "claimed": 1,
        "delivered": 1,
        "skipped": 0,
        "retried": 0,
        "failed": 0,
        "lost": 0,
        "released": 0,
    }
    message = row(engine, row_id)
    assert message.status == "delivered"
    assert message.delivered_at is not None
    assert channel_states(message) == {"email": "done", "sms": "done"}
    apple, google = message.payload["apple_wallet_url"], message.payload["google_wallet_url"]
    assert apple.startswith(WALLET)
    assert google.startswith(WALLET)

    assert fake_smtp.count == 1
    email = fake_smtp.messages[0]
    assert email["To"] == "Ada <ada@example.com>"
    assert email["From"] == "Loyalty <cards@shop.example.com>"
    assert email["Subject"] == "Your Coffee Club loyalty card"
    assert email["Message-ID"]
    assert email.get_content_type() == "multipart/alternative"
    for kind in ("plain", "html"):
        body = email.get_body((kind,))
        assert body is not None
        assert apple in body.get_content()
        assert google in body.get_content()

    sms = fakes["sms"]
    assert sms.count == 1
    sent = sms.messages[0]
    assert sent["To"] == "+14155550123"
    assert sent["From"] == "+15550000000"
    assert apple in sent["Body"]
    assert google in sent["Body"]
    assert sent["idempotency_key"] == message.idempotency_key

    # Nothing is due any more: a second pass sends nothing.
    assert deliver(engine, settings, key, fakes)["claimed"] == 0
    assert (fake_smtp.count, sms.count) == (1, 1)


def test_sms_uses_basic_auth_for_sid_and_token(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    sms: FakeSms = fakes["sms"]
    sms.token = "AC123:s3cret"
    settings = make_settings(
        db_url, SMS_API_URL=SMS_URL, SMS_API_TOKEN="AC123:s3cret", SMS_FROM="+15550000000"
    )
    _, row_id = add_customer_with_card(engine, store, phone="+14155550124")
    captured: list[str] = []
    original = sms.handle

    def spy(request: Any) -> Any:
        captured.append(request.headers.get("Authorization", ""))
        return original(request)

    fakes["transport"] = router({"fake-sms.test": spy})
    assert deliver(engine, settings, key, fakes)["delivered"] == 1
    assert captured == ["Basic " + base64.b64encode(b"AC123:s3cret").decode()]
    assert channel_states(row(engine, row_id)) == {"sms": "done"}


def test_unconfigured_channels_are_skipped_then_retried(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    smtp: tuple[FakeSmtp, str],
    fakes: dict[str, Any],
) -> None:
    fake_smtp, url = smtp
    _, row_id = add_customer_with_card(engine, store, email="ada@example.com", phone="+1415555")
    result = deliver(engine, make_settings(db_url), key, fakes)
    assert (result["skipped"], result["delivered"]) == (1, 0)
    message = row(engine, row_id)
    assert message.status == "skipped"
    assert "SMTP_URL is not set" in (message.last_error or "")
    assert channel_states(message) == {"email": "skipped", "sms": "skipped"}

    # Once SMTP is configured, the operator retries the skipped rows.
    with make_sessionmaker(engine)() as s:
        assert outbox.retry(s, status="skipped") == [row_id]
        s.commit()
    assert deliver(engine, make_settings(db_url, SMTP_URL=url), key, fakes)["delivered"] == 1
    assert fake_smtp.count == 1
    assert channel_states(row(engine, row_id)) == {"email": "done", "sms": "skipped"}


def test_customer_without_email_skips_email(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    smtp: tuple[FakeSmtp, str],
    fakes: dict[str, Any],
) -> None:
    fake_smtp, url = smtp
    _, row_id = add_customer_with_card(engine, store, phone="+14155550125")
    with Session(engine) as s:  # the email channel is asked for, but the address went away
        message = s.get(OutboxMessage, row_id)
        assert message is not None
        message.payload = {**message.payload, "channels": ["email", "sms"]}
        s.commit()
    assert deliver(engine, full_settings(db_url, url), key, fakes)["delivered"] == 1
    assert fake_smtp.count == 0
    message = row(engine, row_id)
    assert channel_states(message) == {"email": "skipped", "sms": "done"}
    assert "customer has no email" in (message.last_error or "")


# --- retries and failures ---------------------------------------------------------------------


def test_transient_errors_back_off_then_park_failed(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    smtp: tuple[FakeSmtp, str],
    fakes: dict[str, Any],
) -> None:
    fake_smtp, url = smtp
    fake_smtp.fail_data_next(451, n=10)
    settings = make_settings(db_url, SMTP_URL=url, OUTBOX_MAX_ATTEMPTS=3)
    _, row_id = add_customer_with_card(engine, store, email="ada@example.com")
    now = T0 + dt.timedelta(days=3650)  # created now; this clock is surely later
    delays = []
    for attempt in (1, 2):
        result = deliver(engine, settings, key, fakes, now=now)
        assert result["retried"] == 1, result
        message = row(engine, row_id)
        assert message.status == "pending"
        assert message.attempts == attempt
        assert "smtp 451" in (message.last_error or "")
        delay = message.next_attempt_at - now
        delays.append(delay)
        ceiling = outbox.BACKOFF_BASE * 2 ** (attempt - 1)
        assert ceiling / 2 <= delay <= ceiling
        # Not due before its time.
        assert deliver(engine, settings, key, fakes, now=now)["claimed"] == 0
        now = message.next_attempt_at
    result = deliver(engine, settings, key, fakes, now=now)
    assert result["failed"] == 1
    message = row(engine, row_id)
    assert message.status == "failed"
    assert message.attempts == 3
    assert "gave up after 3 attempts" in (message.last_error or "")
    assert fake_smtp.count == 0
    assert "email" not in channel_states(message)  # surely not sent: no mark left


def test_permanent_error_fails_at_once_and_retry_resends(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    smtp: tuple[FakeSmtp, str],
    fakes: dict[str, Any],
) -> None:
    fake_smtp, url = smtp
    fake_smtp.fail_rcpt_next(550)
    settings = make_settings(db_url, SMTP_URL=url)
    _, row_id = add_customer_with_card(engine, store, email="gone@example.com")
    assert deliver(engine, settings, key, fakes)["failed"] == 1
    message = row(engine, row_id)
    assert message.status == "failed"
    assert message.attempts == 1
    assert "smtp 550" in (message.last_error or "")
    assert channel_states(message) == {"email": "failed"}

    with make_sessionmaker(engine)() as s:
        assert outbox.retry(s, message_id=row_id) == [row_id]
        s.commit()
    message = row(engine, row_id)
    assert (message.status, message.attempts) == ("pending", 0)
    assert channel_states(message) == {}
    assert deliver(engine, settings, key, fakes)["delivered"] == 1
    assert fake_smtp.count == 1


def test_smtp_login_and_refused_login(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    fake = FakeSmtp(username="mailer", password="pa:ss")
    with fake.serve() as url:
        assert url.startswith("smtp://mailer:pa%3Ass@")
        _, good = add_customer_with_card(engine, store, email="ada@example.com")
        assert deliver(engine, make_settings(db_url, SMTP_URL=url), key, fakes)["delivered"] == 1
        assert fake.count == 1
        _, bad = add_customer_with_card(engine, store, email="bob@example.com")
        wrong = url.replace("pa%3Ass", "nope")
        assert deliver(engine, make_settings(db_url, SMTP_URL=wrong), key, fakes)["failed"] == 1
    assert fake.count == 1
    assert "smtp login refused (535)" in (row(engine, bad).last_error or "")
    assert row(engine, good).status == "delivered"


@pytest.fixture
def authority(tmp_path: Any) -> LocalAuthority:
    return LocalAuthority(tmp_path)


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_smtp_over_tls_verifies_the_server_and_logs_in_encrypted(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    fakes: dict[str, Any],
    authority: LocalAuthority,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    """`?starttls=true` upgrades before AUTH and MAIL (the server refuses both in clear);
    `smtps://` is TLS from the first byte. The server's certificate is verified against the
    trust store (here a test CA through `SSL_CERT_FILE`) and its name (127.0.0.1)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.ca_file))
    fake = FakeSmtp(
        username="mailer",
        password="s3cret",
        tls=mode,  # type: ignore[arg-type]
        tls_context=authority.server_context(),
    )
    with fake.serve() as url:
        assert url.startswith("smtps://") if mode == "implicit" else url.endswith("?starttls=true")
        _, row_id = add_customer_with_card(engine, store, email="ada@example.com")
        assert deliver(engine, make_settings(db_url, SMTP_URL=url), key, fakes)["delivered"] == 1
    assert (fake.count, fake.tls_sessions, fake.login_refusals) == (1, [True], 0)
    assert fake.envelopes[0][1] == ["ada@example.com"]
    assert row(engine, row_id).status == "delivered"


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_smtp_over_tls_refuses_an_untrusted_certificate(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    fakes: dict[str, Any],
    authority: LocalAuthority,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    """A certificate the trust store does not vouch for: nothing is sent (no fallback to clear
    text), the row is retried later with the reason."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    fake = FakeSmtp(tls=mode, tls_context=authority.server_context())  # type: ignore[arg-type]
    with fake.serve() as url:
        _, row_id = add_customer_with_card(engine, store, email="ada@example.com")
        assert deliver(engine, make_settings(db_url, SMTP_URL=url), key, fakes)["retried"] == 1
    assert fake.count == 0
    message = row(engine, row_id)
    assert message.status == "pending"
    assert "SSLCertVerificationError" in (message.last_error or "")


def test_smtp_starttls_asked_but_not_offered_sends_nothing_in_clear(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    smtp: tuple[FakeSmtp, str],
    fakes: dict[str, Any],
) -> None:
    fake, url = smtp  # a server without TLS
    _, row_id = add_customer_with_card(engine, store, email="ada@example.com")
    settings = make_settings(db_url, SMTP_URL=url + "?starttls=true")
    assert deliver(engine, settings, key, fakes)["retried"] == 1
    assert fake.count == 0
    assert "SMTPNotSupportedError" in (row(engine, row_id).last_error or "")


def test_smtp_replies_in_errors_mask_addresses(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    smtp: tuple[FakeSmtp, str],
    fakes: dict[str, Any],
) -> None:
    fake_smtp, url = smtp
    fake_smtp.fail_data_next(554)
    _, row_id = add_customer_with_card(engine, store, email="ada.lovelace@example.com")
    with capture_logs() as logs:
        deliver(engine, make_settings(db_url, SMTP_URL=url), key, fakes)
    error = row(engine, row_id).last_error or ""
    assert "smtp 554" in error
    assert "ada.lovelace@example.com" not in json.dumps(logs, default=str)
    assert any(entry.get("to") == "a***@example.com" for entry in logs)


def test_sms_401_is_permanent(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    settings = make_settings(db_url, SMS_API_URL=SMS_URL, SMS_API_TOKEN="wrong", SMS_FROM="+1555")
    _, row_id = add_customer_with_card(engine, store, phone="+14155550126")
    assert deliver(engine, settings, key, fakes)["failed"] == 1
    message = row(engine, row_id)
    assert "HTTP 401" in (message.last_error or "")
    assert fakes["sms"].count == 0


def test_a_retry_never_resends_a_channel_that_succeeded(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    smtp: tuple[FakeSmtp, str],
    fakes: dict[str, Any],
) -> None:
    fake_smtp, url = smtp
    sms: FakeSms = fakes["sms"]
    sms.fail_next(503)
    settings = full_settings(db_url, url)
    _, row_id = add_customer_with_card(engine, store, email="ada@example.com", phone="+1415555")
    assert deliver(engine, settings, key, fakes)["retried"] == 1
    message = row(engine, row_id)
    assert channel_states(message) == {"email": "done"}
    assert (fake_smtp.count, sms.count) == (1, 0)

    result = deliver(engine, settings, key, fakes, now=message.next_attempt_at)
    assert result["delivered"] == 1
    assert (fake_smtp.count, sms.count) == (1, 1)  # the email was not sent again
    assert channel_states(row(engine, row_id)) == {"email": "done", "sms": "done"}


def test_unknown_outcome_is_never_resent_automatically(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    sms: FakeSms = fakes["sms"]
    sms.accept_then_timeout_next()
    settings = make_settings(db_url, SMS_API_URL=SMS_URL, SMS_API_TOKEN=SMS_TOKEN, SMS_FROM="+1")
    _, row_id = add_customer_with_card(engine, store, phone="+14155550127")
    assert deliver(engine, settings, key, fakes)["failed"] == 1
    message = row(engine, row_id)
    assert channel_states(message) == {"sms": "unknown"}
    assert "outcome unknown" in (message.last_error or "")
    assert sms.count == 1
    # Later passes leave it alone; an operator retry is the explicit decision to send again.
    assert deliver(engine, settings, key, fakes, now=message.created_at + LATER)["claimed"] == 0
    with make_sessionmaker(engine)() as s:
        outbox.retry(s, message_id=row_id)
        s.commit()
    assert deliver(engine, settings, key, fakes)["delivered"] == 1
    assert sms.count == 2


def test_smtp_connection_dropped_after_data_is_unknown(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    smtp: tuple[FakeSmtp, str],
    fakes: dict[str, Any],
) -> None:
    fake_smtp, url = smtp
    fake_smtp.drop_after_data_next()
    _, row_id = add_customer_with_card(engine, store, email="ada@example.com")
    settings = make_settings(db_url, SMTP_URL=url)
    assert deliver(engine, settings, key, fakes)["failed"] == 1
    assert channel_states(row(engine, row_id)) == {"email": "unknown"}
    assert fake_smtp.count == 1


def test_worker_killed_mid_send_does_not_send_again(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    smtp: tuple[FakeSmtp, str],
    fakes: dict[str, Any],
) -> None:
    """A worker claimed the row, committed `attempting` for the email and died: after the lease
    expires the next worker records `unknown` instead of sending, and still does the rest."""
    fake_smtp, url = smtp
    _, row_id = add_customer_with_card(engine, store, email="ada@example.com", phone="+1415555")
    sessions = make_sessionmaker(engine)
    start = row(engine, row_id).created_at + dt.timedelta(seconds=1)
    with sessions() as s, s.begin():
        (claimed,) = outbox.claim(s, limit=10, now=start)
    with sessions() as s, s.begin():
        assert outbox.mark_channel(s, claimed, "email", outbox.ATTEMPTING)
    # Before the lease expires, nobody else may take the row.
    settings = full_settings(db_url, url)
    assert (
        deliver(engine, settings, key, fakes, now=start + dt.timedelta(minutes=1))["claimed"] == 0
    )
    result = deliver(engine, settings, key, fakes, now=start + dt.timedelta(minutes=6))
    assert result["failed"] == 1
    message = row(engine, row_id)
    assert channel_states(message) == {"email": "unknown", "sms": "done"}
    assert message.attempts == 2
    assert fake_smtp.count == 0
    assert fakes["sms"].count == 1
    # The first worker, back from the dead, can't write any more: its lease was fenced off.
    with sessions() as s, s.begin():
        assert not outbox.mark_channel(s, claimed, "email", outbox.DONE)
        assert not outbox.finish(s, claimed, status=outbox.DELIVERED)


def test_rows_without_enough_lease_left_are_given_back(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    sms: FakeSms = fakes["sms"]

    def slow(request: Any) -> Any:
        time.sleep(0.6)
        return sms.handle(request)

    fakes["transport"] = router({"fake-sms.test": slow})
    settings = make_settings(db_url, SMS_API_URL=SMS_URL, SMS_API_TOKEN=SMS_TOKEN, SMS_FROM="+1")
    _, first = add_customer_with_card(engine, store, phone="+14155550130")
    _, second = add_customer_with_card(engine, store, phone="+14155550131")
    result = deliver(engine, settings, key, fakes, lease=dt.timedelta(seconds=1))
    assert (result["claimed"], result["delivered"], result["released"]) == (2, 1, 1)
    assert row(engine, first).status == "delivered"
    message = row(engine, second)
    assert (message.status, message.attempts, channel_states(message)) == ("pending", 0, {})
    assert deliver(engine, settings, key, fakes)["delivered"] == 1
    assert sms.count == 2


def test_a_crashing_row_does_not_strand_the_others(
    engine: Engine,
    db_url: str,
    store: int,
    key: bytes,
    smtp: tuple[FakeSmtp, str],
    fakes: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_smtp, url = smtp
    _, broken = add_customer_with_card(engine, store, email="a@example.com")
    _, fine = add_customer_with_card(engine, store, email="b@example.com")
    import worker.outbox as delivery

    original = delivery.build_card_email

    def explode(**kwargs: Any) -> Any:
        if kwargs["recipient"] == "a@example.com":
            raise RuntimeError("bug")
        return original(**kwargs)

    monkeypatch.setattr(delivery, "build_card_email", explode)
    result = deliver(engine, make_settings(db_url, SMTP_URL=url), key, fakes)
    assert (result["retried"], result["delivered"]) == (1, 1)
    message = row(engine, broken)
    assert message.status == "pending"
    assert message.last_error == "internal error: RuntimeError"
    assert row(engine, fine).status == "delivered"
    assert fake_smtp.count == 1


def test_rows_out_of_attempts_after_crashes_are_parked(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    settings = make_settings(db_url, OUTBOX_MAX_ATTEMPTS=2)
    _, row_id = add_customer_with_card(engine, store, email="ada@example.com")
    sessions = make_sessionmaker(engine)
    now = row(engine, row_id).created_at + dt.timedelta(seconds=1)
    for _ in range(2):  # two workers die holding it
        with sessions() as s, s.begin():
            assert len(outbox.claim(s, limit=1, now=now)) == 1
        now += dt.timedelta(minutes=6)
    assert deliver(engine, settings, key, fakes, now=now)["failed"] == 1
    assert "no attempt finished in 2 tries" in (row(engine, row_id).last_error or "")


# --- write-back -------------------------------------------------------------------------------


def test_writeback_to_shopify_and_square(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    shopify: FakeShopify = fakes["shopify"]
    square: FakeSquare = fakes["square"]
    shop_id = shopify.add_customer(email="ada@example.com")
    square_customer = square.add_customer(given_name="Ada")
    other_square = square.add_customer(given_name="Bob")
    shop_conn = connect_source(
        engine,
        store,
        source="shopify",
        account=SHOP,
        token=TOKEN,
        base_url=SHOPIFY_BASE,
        key=key,
        api_version=API_VERSION,
    )
    square_conn = connect_source(
        engine,
        store,
        source="square",
        account=MERCHANT,
        token=DEFAULT_TOKEN,
        base_url=SQUARE_BASE,
        key=key,
    )
    _, row_id = add_customer_with_card(
        engine,
        store,
        references=[("shopify", str(shop_id)), ("square", square_customer["id"])],
    )
    settings = make_settings(db_url)
    assert deliver(engine, settings, key, fakes)["delivered"] == 1
    message = row(engine, row_id)
    card_url = message.payload["apple_wallet_url"]
    assert channel_states(message) == {
        f"shopify:{shop_conn}:{shop_id}": "done",
        f"square:{square_conn}:{square_customer['id']}": "done",
    }
    owner = f"gid://shopify/Customer/{shop_id}"
    assert shopify.metafields == {
        (owner, "$app:loyalty", "card_url"): {"type": "url", "value": card_url}
    }
    definition = square.attribute_definitions["loyalty-card-url"]
    assert definition["visibility"] == "VISIBILITY_READ_ONLY"
    assert definition["schema"]["$ref"].endswith("squareup.common.String")
    assert square.custom_attributes[(square_customer["id"], "loyalty-card-url")]["value"] == (
        card_url
    )
    with Session(engine) as s:
        connection = s.get(Connection, square_conn)
        assert connection is not None
        assert connection.config["square_card_attribute_definition"] == "loyalty-card-url"

    # A second customer of the same merchant: the definition is not asked for again.
    _, second = add_customer_with_card(
        engine, store, first_name="Bob", references=[("square", other_square["id"])]
    )
    assert deliver(engine, settings, key, fakes)["delivered"] == 1
    assert square.definition_requests == 1
    assert square.attribute_writes == 2

    # An operator retry of a delivered row repeats nothing: every channel is done.
    writes = (shopify.metafield_requests, square.attribute_writes)
    with make_sessionmaker(engine)() as s:
        assert outbox.retry(s, message_id=row_id) == [row_id]
        s.commit()
    assert deliver(engine, settings, key, fakes)["delivered"] == 1
    assert (shopify.metafield_requests, square.attribute_writes) == writes
    assert row(engine, second).status == "delivered"


def test_writeback_is_idempotent_when_repeated(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    """A write whose answer was lost is simply repeated: Shopify's set and Square's
    idempotency key make the second write a no-op."""
    shopify: FakeShopify = fakes["shopify"]
    square: FakeSquare = fakes["square"]
    shop_id = shopify.add_customer(email="ada@example.com")
    sq = square.add_customer(given_name="Ada")
    connect_source(
        engine, store, source="shopify", account=SHOP, token=TOKEN, base_url=SHOPIFY_BASE,
        key=key, api_version=API_VERSION,
    )  # fmt: skip
    connect_source(
        engine, store, source="square", account=MERCHANT, token=DEFAULT_TOKEN,
        base_url=SQUARE_BASE, key=key,
    )  # fmt: skip
    _, row_id = add_customer_with_card(
        engine, store, references=[("shopify", str(shop_id)), ("square", sq["id"])]
    )
    settings = make_settings(db_url)
    assert deliver(engine, settings, key, fakes)["delivered"] == 1
    with Session(engine) as s:  # as if the marks had never been committed
        message = s.get(OutboxMessage, row_id)
        assert message is not None
        message.payload = {k: v for k, v in message.payload.items() if k != "delivery"}
        message.status = "failed"
        s.commit()
    with make_sessionmaker(engine)() as s:
        outbox.retry(s, message_id=row_id)
        s.commit()
    assert deliver(engine, settings, key, fakes)["delivered"] == 1
    assert shopify.metafield_requests == 2
    assert shopify.metafield_writes == 1
    assert square.attribute_writes == 1  # the replayed idempotency key wrote nothing


def test_writeback_errors_are_classified(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    shopify: FakeShopify = fakes["shopify"]
    connect_source(
        engine, store, source="shopify", account=SHOP, token=TOKEN, base_url=SHOPIFY_BASE,
        key=key, api_version=API_VERSION,
    )  # fmt: skip
    _, gone = add_customer_with_card(engine, store, references=[("shopify", "999999")])
    settings = make_settings(db_url)
    shopify.fail_next(3, status=503)  # both client attempts of the first row + one more
    result = deliver(engine, settings, key, fakes)
    assert result["retried"] == 1
    message = row(engine, gone)
    assert "HTTP 503" in (message.last_error or "")
    result = deliver(engine, settings, key, fakes, now=message.next_attempt_at)
    assert result["failed"] == 1
    message = row(engine, gone)
    assert "Owner does not exist" in (message.last_error or "")
    assert shopify.metafields == {}


# --- pass updates -----------------------------------------------------------------------------


def _stamp(engine: Engine, store: int) -> list[int]:
    customer_id, card_row = add_customer_with_card(engine, store, email="ada@example.com")
    with make_sessionmaker(engine)() as s:
        s.execute(delete(OutboxMessage).where(OutboxMessage.id == card_row))
        cc = s.scalar(select(CustomerCard).where(CustomerCard.customer_id == customer_id))
        assert cc is not None
        add_stamps(s, customer_card=cc, stamps=2, idempotency_key="api:one")
        s.commit()
        return list(s.scalars(select(OutboxMessage.id).order_by(OutboxMessage.id)))


def test_pass_updates_are_signed_and_skipped_when_unconfigured(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    ids = _stamp(engine, store)
    assert len(ids) == 2  # pass_update + push
    result = deliver(engine, make_settings(db_url), key, fakes)
    assert result["skipped"] == 2
    assert "PASS_SERVICE_URL" in (row(engine, ids[0]).last_error or "")

    with make_sessionmaker(engine)() as s:
        assert outbox.retry(s, status="skipped") == ids
        s.commit()
    passes: FakePassService = fakes["pass"]
    passes.fail_next(503)
    settings = make_settings(db_url, PASS_SERVICE_URL=PASS_URL, PASS_SERVICE_SECRET=PASS_SECRET)
    result = deliver(engine, settings, key, fakes)
    assert (result["delivered"], result["retried"]) == (1, 1)
    retry_at = max(row(engine, i).next_attempt_at for i in ids)
    assert deliver(engine, settings, key, fakes, now=retry_at)["delivered"] == 1
    assert passes.bad_signatures == 0
    assert passes.duplicates == 0
    assert sorted(r["kind"] for r in passes.received) == ["pass_update", "push"]
    assert all(r["payload"]["stamps"] == 2 for r in passes.received)
    assert all(row(engine, i).status == "delivered" for i in ids)


def test_pass_service_rejecting_our_signature_is_permanent(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    ids = _stamp(engine, store)
    settings = make_settings(db_url, PASS_SERVICE_URL=PASS_URL, PASS_SERVICE_SECRET="not-it")
    assert deliver(engine, settings, key, fakes)["failed"] == 2
    assert fakes["pass"].bad_signatures == 2
    assert "HTTP 401" in (row(engine, ids[0]).last_error or "")


def test_signature_format() -> None:
    body = b'{"a":1}'
    expected = "sha256=" + __import__("hmac").new(b"k", b"17." + body, "sha256").hexdigest()
    assert sign_pass_request("k", body, 17) == expected


# --- loop safety ------------------------------------------------------------------------------


def test_our_own_writeback_webhooks_cause_no_new_write(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    """Shopify answers our metafieldsSet with `customers/update`, Square with
    `customer.custom_attribute.owned.updated`: processing them queues nothing and writes
    nothing back."""
    from models import webhook_processing as wp
    from models.inbox import Delivery, find_routes, insert_batch

    shopify: FakeShopify = fakes["shopify"]
    square: FakeSquare = fakes["square"]
    shop_id = shopify.add_customer(email="ada@example.com", firstName="Ada")
    sq = square.add_customer(given_name="Ada")
    connect_source(
        engine, store, source="shopify", account=SHOP, token=TOKEN, base_url=SHOPIFY_BASE,
        key=key, api_version=API_VERSION,
    )  # fmt: skip
    connect_source(
        engine, store, source="square", account=MERCHANT, token=DEFAULT_TOKEN,
        base_url=SQUARE_BASE, key=key,
    )  # fmt: skip
    customer_id, _ = add_customer_with_card(
        engine,
        store,
        email="ada@example.com",
        references=[("shopify", str(shop_id)), ("square", sq["id"])],
    )
    settings = make_settings(db_url)
    assert deliver(engine, settings, key, fakes)["delivered"] == 1
    rows_before = outbox_total(engine)
    writes = (shopify.metafield_requests, square.attribute_writes, square.definition_requests)

    shopify_update = {
        "id": shop_id,
        "email": "ada@example.com",
        "first_name": "Ada",
        "last_name": None,
        "phone": None,
        "updated_at": (T0 + dt.timedelta(days=3650)).isoformat(),
        "admin_graphql_api_id": f"gid://shopify/Customer/{shop_id}",
    }
    square_event = {
        "merchant_id": MERCHANT,
        "type": "customer.custom_attribute.owned.updated",
        "event_id": "evt-own-1",
        "created_at": T0.isoformat(),
        "data": {
            "type": "custom_attribute",
            "id": f"loyalty-card-url:{sq['id']}",
            "object": {
                "custom_attribute": {"key": "loyalty-card-url", "value": "https://x", "version": 1}
            },
        },
    }
    deliveries = [
        Delivery(
            source="shopify",
            dedupe_key="own-1",
            body=json.dumps(shopify_update),
            topic="customers/update",
            event_id="own-1",
            account=SHOP,
        ),
        Delivery(
            source="square",
            dedupe_key="own-2",
            body=json.dumps(square_event),
            topic="customer.custom_attribute.owned.updated",
            event_id="own-2",
            account=MERCHANT,
        ),
    ]
    with engine.begin() as conn:
        routes: dict[tuple[str, str], Any] = {}
        for source, account in (("shopify", SHOP), ("square", MERCHANT)):
            routes[(source, account)] = find_routes(conn, source, [account]).get(account)
        insert_batch(conn, deliveries, routes)
    wp.drain(make_sessionmaker(engine))
    with Session(engine) as s:
        statuses = {
            str(topic): str(status)
            for topic, status in s.execute(select(WebhookEvent.topic, WebhookEvent.status))
        }
    assert statuses == {
        "customers/update": "done",
        "customer.custom_attribute.owned.updated": "ignored",
    }
    assert outbox_total(engine) == rows_before
    assert deliver(engine, settings, key, fakes, now=T0 + dt.timedelta(days=3650))["claimed"] == 0
    assert (
        shopify.metafield_requests,
        square.attribute_writes,
        square.definition_requests,
    ) == writes
    assert customer_id  # the customer was updated in place, not re-enrolled


# --- operator views ---------------------------------------------------------------------------


def test_list_counts_and_render(
    engine: Engine, db_url: str, store: int, key: bytes, fakes: dict[str, Any]
) -> None:
    _, a = add_customer_with_card(engine, store, email="a@example.com")
    _, b = add_customer_with_card(engine, store, email="b@example.com")
    deliver(engine, make_settings(db_url), key, fakes, limit=1)  # a → skipped
    with make_sessionmaker(engine)() as s:
        assert [m.id for m in outbox.list_messages(s)] == [b, a]
        assert [m.id for m in outbox.list_messages(s, status="skipped")] == [a]
        assert [m.id for m in outbox.list_messages(s, kind="push")] == []
        assert outbox.list_messages(s, store_id=store + 1000) == []
        counts = outbox.status_counts(s)
        assert counts["card_links"]["skipped"] == 1
        assert counts["card_links"]["pending"] == 1
        assert counts["push"] == dict.fromkeys(outbox.STATUSES, 0)
        rendered = outbox.render_message(s.get(OutboxMessage, a))  # type: ignore[arg-type]
        assert rendered["channels"] == {"email": "skipped"}
        assert "email" not in json.dumps(rendered["idempotency_key"])
        assert "a@example.com" not in json.dumps(rendered)
        with pytest.raises(ValueError, match="unknown outbox status"):
            outbox.list_messages(s, status="nope")
        with pytest.raises(ValueError, match="can't retry"):
            outbox.retry(s, status="delivered")
        assert outbox.retry(s, message_id=b) == []  # pending: nothing to retry
