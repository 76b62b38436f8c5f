"""Deliver outbox rows (an edge: reads settings, opens sessions, commits, does the I/O).

    summary = deliver_due(sessionmaker, settings=settings, key=key, limit=100)

One pass: claim up to `limit` due rows (`models.outbox.claim`, committed before anything is
sent), deliver each, record the outcome. Returns counts: `claimed`, `delivered`, `skipped`,
`retried`, `failed`, `lost` (lease lost to another worker mid-row), `released` (claimed but
given back untouched because too little of the lease was left to start them).

**card_links** rows fan out to channels, each recorded on the row as it completes (see
`models.outbox` for the states and the at-most-once rule for email/SMS):

- `email` — SMTP (`SMTP_URL`: `smtp://user:pass@host:port[?starttls=true]`, `smtps://` for
  implicit TLS; sender `SMTP_FROM`): a plain-text + HTML message holding both wallet URLs, with
  a Message-ID derived from the row's idempotency key. One SMTP connection per pass.
- `sms` — a Twilio-style form POST (`To`, `From`, `Body`) to `SMS_API_URL`. `SMS_API_TOKEN`
  of the form `ACCOUNT_SID:AUTH_TOKEN` is sent as HTTP basic auth (Twilio), any other token as
  `Authorization: Bearer <token>`. An `Idempotency-Key` header names the row.
- write-back — for every live external reference of the customer to Shopify/Square and every
  enabled connection of that source in the store: Shopify metafield `<namespace>.card_url`
  (type `url`) via `metafieldsSet`; Square custom attribute `SQUARE_CARD_ATTRIBUTE_KEY`
  (definition created once per connection and remembered in the connection's config). The value
  is the card's Apple Wallet URL (the pass page; Google's link is in the email/SMS).

The address is read from the customer at send time (the payload holds no contact data). A
channel with nothing to do (no email, SMTP not configured) is `skipped`; a row where every
channel was skipped is `skipped`.

**pass_update / push** rows: `POST PASS_SERVICE_URL` with a JSON body, signed
`X-Loyalty-Signature: sha256=<hex HMAC-SHA256(PASS_SERVICE_SECRET, "<timestamp>.<raw body>")>`
plus `X-Loyalty-Timestamp: <unix seconds>` and `Idempotency-Key: <row key>`. Not configured →
`skipped`.

**Errors.** Connection refused, timeouts before the request was sent, 5xx, 429 and SMTP 4xx
replies are transient: the row goes back to `pending` with exponential backoff and jitter, or
is parked `failed` after `OUTBOX_MAX_ATTEMPTS`. 4xx answers (bad address, 401), SMTP 5xx and
Shopify `userErrors` are permanent: the channel is `failed` at once, with the error. An email or
SMS whose outcome is unknown (the answer never came) is `unknown` and is not sent again
automatically.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import html
import json
import re
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formataddr, parseaddr
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from connectors.errors import ConfigurationError, ConnectorError, RetriableError
from connectors.http import classify as classify_http
from connectors.http import make_client
from connectors.ratelimit import RateBudget, make_budget
from models import outbox
from models.crypto import DecryptionFailed, decrypt
from models.tables import (
    CardTemplate,
    Connection,
    Customer,
    CustomerCard,
    ExternalReference,
    Store,
    utcnow,
)
from worker import metrics
from worker.settings import Settings

WRITEBACK_SOURCES = ("shopify", "square")
SIGNATURE_HEADER = "X-Loyalty-Signature"
TIMESTAMP_HEADER = "X-Loyalty-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SQUARE_DEFINITION_CONFIG = "square_card_attribute_definition"
DEFAULT_LIMIT = 100
HTTP_TIMEOUT = 15.0
SMTP_TIMEOUT = 30.0
# The most one row can take (SMTP + SMS + write-backs, each bounded by its timeout).
LEASE_MARGIN = dt.timedelta(minutes=2)


# --- outcomes ---------------------------------------------------------------------------------


class DeliveryError(Exception):
    """Base of the outcomes of one channel that are not success."""


class Transient(DeliveryError):
    """Surely not delivered; try again later."""


class Permanent(DeliveryError):
    """Will never succeed as sent (bad address, refused credentials, invalid request)."""


class Ambiguous(DeliveryError):
    """May or may not have been delivered (the provider's answer never came)."""


def _from_connector(exc: ConnectorError) -> DeliveryError:
    if isinstance(exc, RetriableError):
        return Transient(str(exc))
    return Permanent(str(exc))


# --- SMTP -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Where and how to submit mail; `security` is `plain`, `starttls` or `ssl`."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    security: str = "plain"
    timeout: float = SMTP_TIMEOUT


def parse_smtp_url(url: str) -> SmtpConfig:
    """`smtp://[user:pass@]host[:port][?starttls=true]` or `smtps://…` (implicit TLS).

    Default ports: 25 (smtp), 587 (smtp with starttls), 465 (smtps). ValueError on anything else.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError("SMTP_URL must start with smtp:// or smtps://")
    if not parts.hostname:
        raise ValueError("SMTP_URL has no host")
    query = {k.lower(): v[-1].lower() for k, v in parse_qs(parts.query).items()}
    starttls = query.get("starttls", "false") in ("1", "true", "yes", "on")
    security = "ssl" if parts.scheme == "smtps" else ("starttls" if starttls else "plain")
    default_port = {"ssl": 465, "starttls": 587, "plain": 25}[security]
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise ValueError("SMTP_URL has an invalid port") from exc
    return SmtpConfig(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        security=security,
    )


SmtpFactory = Callable[[SmtpConfig], smtplib.SMTP]
"""Opens an authenticated, ready SMTP session (the test seam)."""


def default_smtp_factory(config: SmtpConfig) -> smtplib.SMTP:
    """Connect, EHLO, STARTTLS when asked (certificate verified), log in when a user is set."""
    context = ssl.create_default_context()
    client: smtplib.SMTP
    if config.security == "ssl":
        client = smtplib.SMTP_SSL(config.host, config.port, timeout=config.timeout, context=context)
    else:
        client = smtplib.SMTP(config.host, config.port, timeout=config.timeout)
    try:
        client.ehlo()
        if config.security == "starttls":
            client.starttls(context=context)
            client.ehlo()
        if config.username:
            client.login(config.username, config.password or "")
    except BaseException:
        client.close()
        raise
    return client


def _reply_error(code: int, message: str) -> DeliveryError:
    """An SMTP reply: 4xx is transient, 5xx permanent (RFC 5321 §4.2.1)."""
    if 400 <= code < 500:
        return Transient(f"smtp {code}: {message}")
    return Permanent(f"smtp {code}: {message}")


_ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def _reply_text(value: bytes | str) -> str:
    """A server reply for logs and `last_error`: one line, addresses masked (servers often
    echo the recipient: "550 5.1.1 <ada@example.com>: Recipient address rejected")."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    text = _ADDRESS.sub(lambda m: mask_email(m.group(0)), text)
    return " ".join(text.split())[:200]


class Mailer:
    """One SMTP session per delivery pass, opened on first use and re-opened when it died."""

    def __init__(self, config: SmtpConfig, factory: SmtpFactory) -> None:
        self._config = config
        self._factory = factory
        self._client: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        if self._client is not None:
            try:
                code, _ = self._client.noop()
                if code == 250:
                    return self._client
            except (smtplib.SMTPException, OSError):
                pass
            self.close()
        try:
            self._client = self._factory(self._config)
        except smtplib.SMTPAuthenticationError as exc:
            raise Permanent(f"smtp login refused ({exc.smtp_code})") from exc
        except smtplib.SMTPResponseException as exc:
            raise _reply_error(exc.smtp_code, _reply_text(exc.smtp_error)) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise Transient(f"smtp connection failed: {type(exc).__name__}") from exc
        return self._client

    def send(self, message: EmailMessage) -> None:
        """Hand one message to the server. Raises Transient/Permanent when it surely was not
        taken, Ambiguous when the connection died while the message was being submitted."""
        client = self._connect()
        try:
            refused = client.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            code, reply = next(iter(exc.recipients.values()))
            raise _reply_error(code, _reply_text(reply)) from exc
        except smtplib.SMTPResponseException as exc:
            # A reply to MAIL/RCPT/DATA or to the end of data: the server did not take it.
            self.close()
            raise _reply_error(exc.smtp_code, _reply_text(exc.smtp_error)) from exc
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            raise Ambiguous(f"smtp connection lost while sending: {type(exc).__name__}") from exc
        if refused:
            code, reply = next(iter(refused.values()))
            raise _reply_error(code, _reply_text(reply))

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


# --- message builders -------------------------------------------------------------------------


def message_id(idempotency_key: str, sender: str) -> str:
    """A stable Message-ID per row: the same delivery always carries the same id."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"<{digest}@{domain}>"


def build_card_email(
    *,
    sender: str,
    recipient: str,
    first_name: str | None,
    store_name: str,
    card_name: str,
    apple_wallet_url: str,
    google_wallet_url: str,
    idempotency_key: str,
) -> EmailMessage:
    """The card-links email: plain text first, an HTML alternative, both wallet URLs in each."""
    greeting = f"Hi {first_name}," if first_name else "Hi,"
    text = (
        f"{greeting}\n\n"
        f"Your {card_name} loyalty card from {store_name} is ready.\n\n"
        f"Add it to Apple Wallet: {apple_wallet_url}\n"
        f"Add it to Google Wallet: {google_wallet_url}\n\n"
        "Show the card at checkout to collect your stamps.\n"
    )
    e = html.escape
    body = (
        "<!doctype html><html><body>"
        f"<p>{e(greeting)}</p>"
        f"<p>Your <strong>{e(card_name)}</strong> loyalty card from {e(store_name)} is ready.</p>"
        f'<p><a href="{e(apple_wallet_url, quote=True)}">Add to Apple Wallet</a></p>'
        f'<p><a href="{e(google_wallet_url, quote=True)}">Add to Google Wallet</a></p>'
        "<p>Show the card at checkout to collect your stamps.</p>"
        "</body></html>"
    )
    message = EmailMessage()
    message["Subject"] = f"Your {card_name} loyalty card"
    message["From"] = sender
    message["To"] = formataddr((first_name or "", recipient))
    message["Message-ID"] = message_id(idempotency_key, sender)
    message["Date"] = dt.datetime.now(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    message.set_content(text)
    message.add_alternative(body, subtype="html")
    return message


def sms_body(
    *, store_name: str, card_name: str, apple_wallet_url: str, google_wallet_url: str
) -> str:
    return (
        f"{store_name}: your {card_name} loyalty card is ready. "
        f"Apple Wallet: {apple_wallet_url} Google Wallet: {google_wallet_url}"
    )


def sms_auth(token: str) -> tuple[httpx.Auth | None, dict[str, str]]:
    """`SID:SECRET` → HTTP basic (Twilio); anything else → a bearer header."""
    sid, sep, secret = token.partition(":")
    if sep and sid and secret:
        return httpx.BasicAuth(sid, secret), {}
    return None, {"Authorization": f"Bearer {token}"}


def sign_pass_request(secret: str, body: bytes, timestamp: int) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>." + body) — what the pass service
    verifies (the timestamp is signed too, so a captured request can't be replayed later)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def mask_email(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


def mask_phone(number: str) -> str:
    return f"***{number[-2:]}" if len(number) > 2 else "***"


# --- HTTP sends -------------------------------------------------------------------------------


def _post(
    http: httpx.Client,
    url: str,
    *,
    ambiguous_timeouts: bool,
    **kwargs: Any,
) -> httpx.Response:
    """One POST, classified. Not-sent failures → Transient; a lost answer → Ambiguous when
    `ambiguous_timeouts` (non-idempotent receivers), else Transient."""
    try:
        response = http.post(url, **kwargs)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise Transient(f"{type(exc).__name__}: could not connect") from exc
    except httpx.UnsupportedProtocol as exc:
        raise Permanent("the URL has no supported scheme") from exc
    except httpx.TransportError as exc:
        if ambiguous_timeouts:
            raise Ambiguous(f"{type(exc).__name__}: no answer") from exc
        raise Transient(f"{type(exc).__name__}: no answer") from exc
    try:
        classify_http(response)
    except ConnectorError as exc:
        raise _from_connector(exc) from exc
    return response


# --- one pass ---------------------------------------------------------------------------------


@dataclass(slots=True)
class DeliveryContext:
    """What a pass shares between rows: settings, clients, the open SMTP session."""

    settings: Settings
    key: bytes
    http: httpx.Client
    transport: httpx.BaseTransport | None
    mailer: Mailer | None
    sleep: Callable[[float], None]
    budgets: dict[str, RateBudget] = field(default_factory=dict)
    source_clients: dict[int, Any] = field(default_factory=dict)
    square_definitions: set[tuple[int, str]] = field(default_factory=set)

    def budget(self, source: str) -> RateBudget:
        from worker.sync import SHOPIFY_BUDGET, SQUARE_BUDGET

        if source not in self.budgets:
            capacity, rate = SHOPIFY_BUDGET if source == "shopify" else SQUARE_BUDGET
            self.budgets[source] = make_budget(
                redis_url=self.settings.redis_url, capacity=capacity, refill_per_second=rate
            )
        return self.budgets[source]


@dataclass(slots=True)
class PassSummary:
    claimed: int = 0
    delivered: int = 0
    skipped: int = 0
    retried: int = 0
    failed: int = 0
    lost: int = 0
    released: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "claimed": self.claimed,
            "delivered": self.delivered,
            "skipped": self.skipped,
            "retried": self.retried,
            "failed": self.failed,
            "lost": self.lost,
            "released": self.released,
        }


class LeaseLost(Exception):
    """Another worker owns the row now: stop touching it."""


@dataclass(slots=True)
class _RowResult:
    """The channels' outcomes of one row."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    transient: list[str] = field(default_factory=list)
    permanent: list[str] = field(default_factory=list)
    retry_after: float | None = None


class _RowRunner:
    """Delivers one claimed row; every channel mark is committed before the next step."""

    def __init__(
        self,
        sessionmaker: sessionmaker[Session],
        ctx: DeliveryContext,
        claimed: outbox.Claim,
        clock: Callable[[], dt.datetime],
        logger: Any,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.ctx = ctx
        self.claim = claimed
        self.clock = clock
        self.result = _RowResult()
        self.log = logger.bind(outbox_id=claimed.id, kind=claimed.kind, attempt=claimed.attempts)

    # -- marks ---------------------------------------------------------------------------

    def mark(self, channel: str, state: str | None, note: str | None = None) -> None:
        with self.sessionmaker() as session, session.begin():
            ok = outbox.mark_channel(
                session, self.claim, channel, state, note=note, now=self.clock()
            )
        if not ok:
            raise LeaseLost(channel)

    def record(self, channel: str, error: DeliveryError | None, *, kind_label: str) -> None:
        """Note one channel's outcome (marks committed for done/failed/skipped)."""
        if error is None:
            self.mark(channel, outbox.DONE)
            self.result.done.append(channel)
            metrics.OUTBOX_DELIVERED.labels(kind=self.claim.kind, channel=kind_label).inc()
            self.log.info("outbox.channel.delivered", channel=channel)
        elif isinstance(error, Transient):
            self.result.transient.append(f"{channel}: {error}")
            self.log.warning("outbox.channel.transient", channel=channel, error=str(error))
        elif isinstance(error, Ambiguous):
            self.mark(channel, outbox.UNKNOWN, note=str(error))
            self.result.permanent.append(f"{channel}: outcome unknown ({error})")
            self.log.error("outbox.channel.unknown", channel=channel, error=str(error))
        else:
            self.mark(channel, outbox.CHANNEL_FAILED, note=str(error))
            self.result.permanent.append(f"{channel}: {error}")
            self.log.warning("outbox.channel.failed", channel=channel, error=str(error))

    def skip(self, channel: str, reason: str) -> None:
        self.mark(channel, outbox.CHANNEL_SKIPPED, note=reason)
        self.result.skipped.append(f"{channel}: {reason}")
        self.log.info("outbox.channel.skipped", channel=channel, reason=reason)

    def settled(self, channel: str) -> bool:
        """True when the channel needs no work now (done, or failed/unknown until an operator
        retry); an `attempting` mark left by an earlier claim becomes `unknown` here."""
        state = self.claim.channel_state(channel)
        if state == outbox.DONE:
            self.result.done.append(channel)
            return True
        if state == outbox.ATTEMPTING:
            self.mark(channel, outbox.UNKNOWN, note="a previous attempt did not finish")
            state = outbox.UNKNOWN
            self.log.error("outbox.channel.unknown", channel=channel, reason="interrupted")
        if state in (outbox.UNKNOWN, outbox.CHANNEL_FAILED):
            entry = self.claim.progress().get(channel, {})
            label = "outcome unknown" if state == outbox.UNKNOWN else "failed"
            self.result.permanent.append(f"{channel}: {label} ({entry.get('note', '')})")
            return True
        return False

    def send_once(self, channel: str, send: Callable[[], None], *, label: str) -> None:
        """At-most-once: commit `attempting`, send, commit `done` (or clear when surely not
        sent, `unknown` when the answer was lost)."""
        self.mark(channel, outbox.ATTEMPTING)
        try:
            send()
        except Transient as exc:
            self.mark(channel, None)
            self.record(channel, exc, kind_label=label)
            return
        except DeliveryError as exc:
            self.record(channel, exc, kind_label=label)
            return
        self.record(channel, None, kind_label=label)

    # -- card links ----------------------------------------------------------------------

    def card_links(self) -> None:
        payload = self.claim.payload
        with self.sessionmaker() as session:
            customer_id = payload.get("customer_id")
            customer = session.get(Customer, customer_id) if isinstance(customer_id, int) else None
            cc_id = payload.get("customer_card_id")
            cc = session.get(CustomerCard, cc_id) if isinstance(cc_id, int) else None
            if customer is None or customer.store_id != self.claim.store_id:
                self.result.skipped.append("customer no longer exists")
                return
            if cc is None or cc.customer_id != customer.id:
                self.result.skipped.append("customer card no longer exists")
                return
            if customer.state != "active":
                self.result.skipped.append(f"customer is {customer.state}")
                return
            store = session.get(Store, customer.store_id)
            card = session.get(CardTemplate, cc.card_id)
            info = {
                "email": customer.email,
                "phone": customer.phone,
                "first_name": customer.first_name,
                "store_name": store.name if store else "",
                "card_name": card.name if card else "loyalty card",
            }
            targets = _writeback_targets(session, customer)
        apple = str(payload.get("apple_wallet_url") or "")
        google = str(payload.get("google_wallet_url") or "")
        channels = payload.get("channels") or []
        if "email" in channels:
            self._email(info, apple, google)
        if "sms" in channels:
            self._sms(info, apple, google)
        self._writebacks(targets, apple)

    def _email(self, info: Mapping[str, Any], apple: str, google: str) -> None:
        channel = "email"
        if self.settled(channel):
            return
        address = info["email"]
        if not address:
            self.skip(channel, "customer has no email")
            return
        if self.ctx.mailer is None:
            self.skip(channel, "SMTP_URL is not set")
            return
        message = build_card_email(
            sender=self.ctx.settings.smtp_from,
            recipient=address,
            first_name=info["first_name"],
            store_name=info["store_name"],
            card_name=info["card_name"],
            apple_wallet_url=apple,
            google_wallet_url=google,
            idempotency_key=self.claim.idempotency_key,
        )
        mailer = self.ctx.mailer
        self.log.info("outbox.email.sending", to=mask_email(address))
        self.send_once(channel, lambda: mailer.send(message), label="email")

    def _sms(self, info: Mapping[str, Any], apple: str, google: str) -> None:
        channel = "sms"
        if self.settled(channel):
            return
        number = info["phone"]
        settings = self.ctx.settings
        if not number:
            self.skip(channel, "customer has no phone")
            return
        if not settings.sms_api_url or settings.sms_api_token is None:
            self.skip(channel, "SMS_API_URL / SMS_API_TOKEN is not set")
            return
        auth, headers = sms_auth(settings.sms_api_token.get_secret_value())
        headers[IDEMPOTENCY_HEADER] = self.claim.idempotency_key
        form = {
            "To": number,
            "From": settings.sms_from or "",
            "Body": sms_body(
                store_name=info["store_name"],
                card_name=info["card_name"],
                apple_wallet_url=apple,
                google_wallet_url=google,
            ),
        }
        url = settings.sms_api_url

        def send() -> None:
            _post(
                self.ctx.http,
                url,
                ambiguous_timeouts=True,
                data=form,
                headers=headers,
                auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT,
            )

        self.log.info("outbox.sms.sending", to=mask_phone(number))
        self.send_once(channel, send, label="sms")

    def _writebacks(self, targets: list[_Target], card_url: str) -> None:
        if not card_url:
            if targets:
                self.result.permanent.append("write-back: the payload has no card URL")
            return
        # Several connections of one source: the customer lives in one of them; a refusal
        # from the others is "not here" once one of them took the value.
        groups: dict[tuple[str, str], list[_Target]] = {}
        for target in targets:
            groups.setdefault((target.source, target.external_id), []).append(target)
        for group in groups.values():
            refused: list[tuple[str, Permanent]] = []
            wrote = False
            for target in group:
                channel = target.channel
                if self.settled(channel):
                    wrote = wrote or self.claim.channel_state(channel) == outbox.DONE
                    continue
                try:
                    self._write_one(target, card_url)
                except Permanent as exc:
                    refused.append((channel, exc))
                    continue
                except Transient as exc:
                    self.record(channel, exc, kind_label=target.source)
                    continue
                self.record(channel, None, kind_label=target.source)
                wrote = True
            for refused_channel, refusal in refused:
                if wrote and len(group) > 1:
                    self.skip(refused_channel, f"not this account ({refusal})")
                else:
                    label = refused_channel.split(":", 1)[0]
                    self.record(refused_channel, refusal, kind_label=label)

    def _write_one(self, target: _Target, card_url: str) -> None:
        try:
            client = self._client(target)
            if target.source == "shopify":
                from connectors.shopify.writeback import set_card_url

                set_card_url(
                    client,
                    external_id=target.external_id,
                    namespace=self.ctx.settings.shopify_metafield_namespace,
                    card_url=card_url,
                )
            else:
                from connectors.square.writeback import upsert_card_url

                attribute_key = self.ctx.settings.square_card_attribute_key
                self._ensure_square_definition(target, client, attribute_key)
                upsert_card_url(
                    client,
                    customer_id=target.external_id,
                    key=attribute_key,
                    card_url=card_url,
                    idempotency_key=hashlib.sha256(
                        f"{self.claim.idempotency_key}|{target.external_id}|{card_url}".encode()
                    ).hexdigest()[:40],
                )
        except ConnectorError as exc:
            raise _from_connector(exc) from exc
        except DecryptionFailed as exc:
            raise Permanent("connection credentials can't be decrypted with SECRET_KEY") from exc

    def _client(self, target: _Target) -> Any:
        cached = self.ctx.source_clients.get(target.connection_id)
        if cached is not None:
            return cached
        secrets = target.secrets(self.ctx.key)
        token = secrets.get("access_token", "")
        if not token:
            raise ConfigurationError(f"{target.source} connection has no access token")
        http = make_client(
            base_url=target.api_base_url, timeout=HTTP_TIMEOUT, transport=self.ctx.transport
        )
        client: Any
        if target.source == "shopify":
            from connectors.shopify.client import ShopifyClient

            client = ShopifyClient(
                http=http,
                shop_domain=target.account,
                access_token=token,
                api_version=target.api_version or self.ctx.settings.shopify_api_version,
                budget=self.ctx.budget("shopify"),
                budget_key=f"shopify:{target.account}",
                sleep=self.ctx.sleep,
                max_attempts=2,
            )
        else:
            from connectors.square.client import SquareClient

            client = SquareClient(
                http=http,
                access_token=token,
                square_version=self.ctx.settings.square_version,
                budget=self.ctx.budget("square"),
                budget_key=f"square:{target.account}",
                sleep=self.ctx.sleep,
                max_attempts=2,
            )
        self.ctx.source_clients[target.connection_id] = client
        return client

    def _ensure_square_definition(self, target: _Target, client: Any, attribute_key: str) -> None:
        memo = (target.connection_id, attribute_key)
        if memo in self.ctx.square_definitions or target.definition == attribute_key:
            return
        from connectors.square.writeback import ensure_definition

        created = ensure_definition(client, key=attribute_key)
        with self.sessionmaker() as session, session.begin():
            connection = session.get(Connection, target.connection_id)
            if connection is not None:
                connection.config = {
                    **(connection.config or {}),
                    SQUARE_DEFINITION_CONFIG: attribute_key,
                }
        self.ctx.square_definitions.add(memo)
        self.log.info(
            "outbox.square.definition", connection_id=target.connection_id, created=created
        )

    # -- pass service --------------------------------------------------------------------

    def pass_service(self) -> None:
        settings = self.ctx.settings
        channel = "pass_service"
        if self.settled(channel):
            return
        if not settings.pass_service_url or settings.pass_service_secret is None:
            self.result.skipped.append("PASS_SERVICE_URL / PASS_SERVICE_SECRET is not set")
            return
        body = json.dumps(
            {
                "id": self.claim.id,
                "kind": self.claim.kind,
                "store_id": self.claim.store_id,
                "idempotency_key": self.claim.idempotency_key,
                "payload": {
                    k: v for k, v in self.claim.payload.items() if k != outbox.PROGRESS_KEY
                },
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_pass_request(
                settings.pass_service_secret.get_secret_value(), body, timestamp
            ),
            TIMESTAMP_HEADER: str(timestamp),
            IDEMPOTENCY_HEADER: self.claim.idempotency_key,
        }
        try:
            _post(
                self.ctx.http,
                settings.pass_service_url,
                ambiguous_timeouts=False,
                content=body,
                headers=headers,
            )
        except DeliveryError as exc:
            self.record(channel, exc, kind_label="pass_service")
            return
        self.record(channel, None, kind_label="pass_service")

    # -- the whole row -------------------------------------------------------------------

    def run(self, summary: PassSummary) -> None:
        max_attempts = self.ctx.settings.outbox_max_attempts
        try:
            if self.claim.attempts > max_attempts:
                self._finish(
                    outbox.FAILED,
                    f"no attempt finished in {max_attempts} tries (worker stopped each time)",
                )
                summary.failed += 1
                return
            if self.claim.kind == "card_links":
                self.card_links()
            elif self.claim.kind in ("pass_update", "push"):
                self.pass_service()
            else:
                self.result.permanent.append(f"unknown outbox kind {self.claim.kind!r}")
            self._conclude(summary, max_attempts)
        except LeaseLost:
            summary.lost += 1
            self.log.warning("outbox.lease_lost")
        except Exception as exc:  # one row's bug must not strand the others
            # Channels it had marked `attempting` become `unknown` on the next claim (never
            # re-sent); the row itself is retried with backoff like a transient failure.
            self.log.exception("outbox.row.crashed", error_type=type(exc).__name__)
            self.result = _RowResult(transient=[f"internal error: {type(exc).__name__}"])
            try:
                self._conclude(summary, max_attempts)
            except LeaseLost:
                summary.lost += 1

    def _conclude(self, summary: PassSummary, max_attempts: int) -> None:
        result = self.result
        if result.transient:
            error = "; ".join(result.transient + result.permanent)
            if self.claim.attempts >= max_attempts:
                self._finish(
                    outbox.FAILED, f"gave up after {self.claim.attempts} attempts: {error}"
                )
                summary.failed += 1
                return
            delay = outbox.backoff(self.claim.attempts)
            self._finish(outbox.PENDING, error, retry_at=self.clock() + delay)
            summary.retried += 1
            self.log.info("outbox.retry", delay_seconds=round(delay.total_seconds(), 1))
            return
        if result.permanent:
            self._finish(outbox.FAILED, "; ".join(result.permanent))
            summary.failed += 1
            return
        if result.done:
            note = "; ".join(result.skipped) or None
            self._finish(outbox.DELIVERED, note)
            summary.delivered += 1
            return
        self._finish(outbox.SKIPPED, "; ".join(result.skipped) or "nothing to deliver")
        summary.skipped += 1

    def _finish(self, status: str, error: str | None, retry_at: dt.datetime | None = None) -> None:
        with self.sessionmaker() as session, session.begin():
            ok = outbox.finish(
                session, self.claim, status=status, error=error, retry_at=retry_at, now=self.clock()
            )
        if not ok:
            raise LeaseLost("finish")
        self.log.info("outbox.row.finished", status=status)


@dataclass(frozen=True, slots=True)
class _Target:
    """One write-back: a source record of the customer, through one connection."""

    connection_id: int
    source: str
    account: str
    api_base_url: str
    api_version: str | None
    sealed: str = field(repr=False)
    external_id: str
    definition: str | None

    @property
    def channel(self) -> str:
        return f"{self.source}:{self.connection_id}:{self.external_id}"

    def secrets(self, key: bytes) -> dict[str, str]:
        data = json.loads(decrypt(self.sealed, key=key))
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _writeback_targets(session: Session, customer: Customer) -> list[_Target]:
    refs = session.scalars(
        select(ExternalReference)
        .where(
            ExternalReference.customer_id == customer.id,
            ExternalReference.source.in_(WRITEBACK_SOURCES),
            ExternalReference.deleted_at.is_(None),
        )
        .order_by(ExternalReference.id)
    ).all()
    if not refs:
        return []
    connections = session.scalars(
        select(Connection)
        .where(
            Connection.store_id == customer.store_id,
            Connection.source.in_(WRITEBACK_SOURCES),
            Connection.enabled.is_(True),
        )
        .order_by(Connection.id)
    ).all()
    targets = []
    for ref in refs:
        for connection in connections:
            if connection.source != ref.source:
                continue
            targets.append(
                _Target(
                    connection_id=connection.id,
                    source=connection.source,
                    account=connection.account,
                    api_base_url=connection.api_base_url,
                    api_version=connection.api_version,
                    sealed=connection.credentials,
                    external_id=ref.external_id,
                    definition=(connection.config or {}).get(SQUARE_DEFINITION_CONFIG),
                )
            )
    return targets


@contextmanager
def _context(
    settings: Settings,
    key: bytes,
    transport: httpx.BaseTransport | None,
    smtp_factory: SmtpFactory | None,
    sleep: Callable[[float], None],
) -> Iterator[DeliveryContext]:
    mailer = None
    if settings.smtp_url is not None and settings.smtp_url.get_secret_value():
        config = parse_smtp_url(settings.smtp_url.get_secret_value())
        mailer = Mailer(config, smtp_factory or default_smtp_factory)
    http = httpx.Client(timeout=httpx.Timeout(HTTP_TIMEOUT, connect=5.0), transport=transport)
    ctx = DeliveryContext(
        settings=settings, key=key, http=http, transport=transport, mailer=mailer, sleep=sleep
    )
    try:
        yield ctx
    finally:
        if mailer is not None:
            mailer.close()
        for client in ctx.source_clients.values():
            inner = getattr(client, "_http", None)
            if isinstance(inner, httpx.Client):
                inner.close()
        http.close()


def deliver_due(
    sessionmaker: sessionmaker[Session],
    *,
    settings: Settings,
    key: bytes,
    limit: int = DEFAULT_LIMIT,
    now: dt.datetime | None = None,
    transport: httpx.BaseTransport | None = None,
    smtp_factory: SmtpFactory | None = None,
    lease: dt.timedelta = outbox.DEFAULT_LEASE,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, int]:
    """Claim up to `limit` due rows, deliver each, record the outcome; returns the pass counts.

    `now` fixes the clock of the pass (tests); `transport` is the HTTP seam (SMS, pass
    service, Shopify/Square), `smtp_factory` the SMTP one. Safe to run in any number of workers
    at once: a row is claimed by exactly one of them (see `models.outbox`). Raises
    `ValueError` for an unparsable `SMTP_URL` before claiming anything.
    """
    clock: Callable[[], dt.datetime] = (lambda: now) if now is not None else utcnow
    # Resolved per pass, not cached at import: each CLI invocation configures its own output.
    log = structlog.get_logger(__name__)
    summary = PassSummary()
    with _context(settings, key, transport, smtp_factory, sleep) as ctx:
        with sessionmaker() as session, session.begin():
            claims = outbox.claim(session, limit=limit, now=clock(), lease=lease)
        summary.claimed = len(claims)
        # A row is only started while enough of its lease is left to finish it (slow SMTP,
        # timeouts); the rest go back to `pending` for the next pass or another worker.
        margin = min(lease / 2, LEASE_MARGIN)
        for index, claimed in enumerate(claims):
            if clock() > claimed.lease_until - margin:
                with sessionmaker() as session, session.begin():
                    for rest in claims[index:]:
                        outbox.release(session, rest, now=clock())
                summary.released = len(claims) - index
                break
            _RowRunner(sessionmaker, ctx, claimed, clock, log).run(summary)
    if summary.claimed:
        log.info("outbox.pass", **summary.as_dict())
    return summary.as_dict()
