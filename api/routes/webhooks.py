"""Webhook intake: signed Shopify and Square deliveries into the inbox (`webhook_events`).

Each request: endpoint enabled? (an empty secret/key disables it: 404) → read the raw body,
capped at `WEBHOOK_MAX_BYTES` (413, from Content-Length or while streaming) → verify the
signature on the raw bytes, constant time (401, nothing stored) → parse just enough to route and
dedupe → hand the row to the group-commit writer (api/intake.py) → answer once it is committed:
200 `{"status": "accepted"|"duplicate"|"ignored"}`, or 400 for a signed body that doesn't parse
(stored as `invalid`), or 503 + Retry-After when the inbox could not be written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from api.errors import ApiError
from api.intake import RETRY_AFTER_SECONDS, SOURCES, IntakeUnavailable, IntakeWriter
from api.middleware import log_request, request_id_of
from api.schemas import ErrorOut
from connectors.shopify import webhooks as shopify
from connectors.square import webhooks as square
from models import inbox
from models.inbox import Delivery
from worker.metrics import WEBHOOKS_REJECTED
from worker.settings import Settings

log = structlog.get_logger("api.webhooks")

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

# Refusals before storage, by metric reason (children bound once: no label look-up per request).
# A missing signature counts as `bad_signature`; the log line keeps the finer reason.
_REJECTED = {
    (source, reason): WEBHOOKS_REJECTED.labels(source=source, reason=reason)
    for source in SOURCES
    for reason in ("bad_signature", "too_large", "disabled")
}


# The three possible answers, encoded once.
_ACK_BODIES = {
    status: json.dumps({"status": status}, separators=(",", ":")).encode()
    for status in ("accepted", "duplicate", "ignored")
}


class WebhookAckOut(BaseModel):
    status: Literal["accepted", "duplicate", "ignored"]


RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": WebhookAckOut, "description": "Stored (or already stored): never resend"},
    400: {"model": ErrorOut, "description": "Signed, but the body does not parse (stored)"},
    401: {"model": ErrorOut, "description": "Missing or invalid signature (nothing stored)"},
    404: {"model": ErrorOut, "description": "Endpoint not configured"},
    413: {"model": ErrorOut, "description": "Body larger than WEBHOOK_MAX_BYTES"},
    503: {"model": ErrorOut, "description": "Inbox unavailable; retry later"},
}

# Headers kept with a row (lower-case names): the delivery's own metadata, never a signature.
_SHOPIFY_PREFIXES = ("x-shopify-", "shopify-")
_SQUARE_PREFIXES = ("square-", "x-square-")
_COMMON_HEADERS = ("content-type", "user-agent")


def _kept_headers(items: Iterable[tuple[str, str]], prefixes: tuple[str, ...]) -> dict[str, str]:
    kept: dict[str, str] = {}
    for name, value in items:
        lower = name.lower()
        if "hmac" in lower or "signature" in lower:
            continue
        if (lower.startswith(prefixes) or lower in _COMMON_HEADERS) and lower not in kept:
            kept[lower] = inbox.clean_text(value, inbox.HEADER_VALUE_LEN) or ""
            if len(kept) >= inbox.MAX_HEADERS:
                break
    return kept


async def read_body(request: Request, limit: int, declared: str | None = None) -> bytes:
    """The raw body, never buffering more than `limit` bytes (413 beyond it). `declared` is the
    Content-Length when the caller has the headers at hand already."""
    if declared is None:
        declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid Content-Length") from None
        if size > limit:
            raise ApiError(413, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise ApiError(413, f"body larger than {limit} bytes")
        body += chunk
    return bytes(body)


def _writer(request: Request) -> IntakeWriter:
    writer: IntakeWriter = request.app.state.intake
    return writer


def _reject(request: Request, source: str, reason: str, account: str | None) -> ApiError:
    """Count and log a rejected signature (no signature value, no secret), return the 401."""
    writer = _writer(request)
    writer.rejected[f"{source}.{reason}"] += 1
    _REJECTED[(source, "bad_signature")].inc()
    log.warning(
        "webhook.unauthorized",
        source=source,
        reason=reason,
        account=account,
        rejected_total=sum(v for k, v in writer.rejected.items() if k.startswith(f"{source}.")),
        client=request.client.host if request.client else None,
    )
    return ApiError(401, "invalid webhook signature")


def _disabled(source: str) -> ApiError:
    _REJECTED[(source, "disabled")].inc()
    return ApiError(404, "Not found")


async def _read_body(
    request: Request, source: str, limit: int, declared: str | None = None
) -> bytes:
    """`read_body`, counting a 413 as rejected `too_large`."""
    try:
        return await read_body(request, limit, declared)
    except ApiError as exc:
        if exc.status == 413:
            _REJECTED[(source, "too_large")].inc()
        raise


def _parse_object(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """`(payload, None)` for a JSON object; `(None, reason)` otherwise."""
    try:
        payload = json.loads(text)
    except ValueError as exc:
        return None, f"body is not JSON: {exc}"[:300]
    except RecursionError:
        return None, "body is not JSON: nested too deeply"
    if not isinstance(payload, dict):
        return None, "body is not a JSON object"
    return payload, None


async def _store(request: Request, delivery: Delivery) -> Response:
    try:
        outcome = await _writer(request).submit(delivery)
    except IntakeUnavailable:
        raise ApiError(
            503,
            "webhook inbox unavailable, retry later",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        ) from None
    if delivery.invalid_reason is not None:
        # Stored (or already stored) as `invalid`: the sender learns its body is broken.
        raise ApiError(400, f"unparseable webhook body ({delivery.invalid_reason})")
    return Response(_ACK_BODIES[outcome], media_type="application/json")


@router.post("/shopify", responses=RESPONSES, response_model=WebhookAckOut)
async def shopify_webhook(request: Request) -> Response:
    """A Shopify delivery: `X-Shopify-Hmac-Sha256` over the raw body with any configured secret;
    routed by `X-Shopify-Shop-Domain`, deduplicated on `X-Shopify-Webhook-Id`."""
    settings: Settings = request.app.state.settings
    secrets = request.app.state.shopify_secrets
    if not secrets:
        raise _disabled("shopify")
    # ASGI header names are lower-case bytes: one decoded dict, looked up directly (a
    # `request.headers` look-up scans and decodes every header each time).
    headers: dict[str, str] = {}
    for name, value in request.scope["headers"]:
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    raw = await _read_body(
        request, "shopify", settings.webhook_max_bytes, headers.get("content-length")
    )

    def h(name: str, max_len: int = inbox.EVENT_ID_LEN) -> str | None:
        return inbox.clean_text(shopify.header(headers, name), max_len)

    domain = h("Shop-Domain", inbox.ACCOUNT_LEN)
    account = domain.lower() if domain else None
    signature = shopify.header(headers, "Hmac-Sha256")
    if not signature:
        raise _reject(request, "shopify", "missing_signature", account)
    if not shopify.verify_hmac(raw, signature, secrets):
        raise _reject(request, "shopify", "bad_signature", account)

    topic = h("Topic", inbox.TOPIC_LEN)
    webhook_id, event_id = h("Webhook-Id"), h("Event-Id")
    if webhook_id:
        key = webhook_id
    elif event_id:
        # One merchant action emits several topics sharing an event id: keep the topic in it.
        key = inbox.dedupe_key("event", topic or "", event_id)
    else:
        key = inbox.dedupe_key("sha256", topic or "", inbox.body_digest(raw))
    text, invalid = inbox.body_text(raw)
    if invalid is None:
        _, invalid = _parse_object(text)
    delivery = Delivery(
        source="shopify",
        dedupe_key=inbox.dedupe_key(key),
        body=text,
        headers=_kept_headers(headers.items(), _SHOPIFY_PREFIXES),
        topic=topic,
        event_id=event_id,
        account=account,
        api_version=h("API-Version", inbox.API_VERSION_LEN),
        triggered_at=inbox.parse_timestamp(shopify.header(headers, "Triggered-At")),
        invalid_reason=invalid,
    )
    return await _store(request, delivery)


@router.post("/square", responses=RESPONSES, response_model=WebhookAckOut)
async def square_webhook(request: Request) -> Response:
    """A Square delivery: `x-square-hmacsha256-signature` over `SQUARE_WEBHOOK_URL` + raw body;
    routed by `merchant_id`, deduplicated on `event_id`."""
    settings: Settings = request.app.state.settings
    key = settings.square_webhook_signature_key.get_secret_value()
    url = settings.square_webhook_url
    if not key or not url:
        raise _disabled("square")
    raw = await _read_body(request, "square", settings.webhook_max_bytes)
    signature = square.signature_header(request.headers.items())
    if not signature:
        raise _reject(request, "square", "missing_signature", None)
    if not square.verify_signature(raw, signature, signature_key=key, notification_url=url):
        raise _reject(request, "square", "bad_signature", None)

    text, invalid = inbox.body_text(raw)
    payload: dict[str, Any] = {}
    if invalid is None:
        parsed, invalid = _parse_object(text)
        payload = parsed or {}
    event_id = inbox.clean_text(payload.get("event_id"), inbox.EVENT_ID_LEN)
    delivery = Delivery(
        source="square",
        dedupe_key=inbox.dedupe_key(event_id)
        if event_id
        else inbox.dedupe_key("sha256", inbox.body_digest(raw)),
        body=text,
        headers=_kept_headers(request.headers.items(), _SQUARE_PREFIXES),
        topic=inbox.clean_text(payload.get("type"), inbox.TOPIC_LEN),
        event_id=event_id,
        account=inbox.clean_text(payload.get("merchant_id"), inbox.ACCOUNT_LEN),
        triggered_at=inbox.parse_timestamp(payload.get("created_at")),
        invalid_reason=invalid,
    )
    return await _store(request, delivery)


# --- the fast path ------------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]
# POST paths answered without FastAPI's routing, dependency and exception machinery (which cost
# several times the intake itself per request); same handlers, same answers, same request id
# header and log line as any other route (api/app.py `LoyaltyApp`).
FAST_ROUTES: dict[str, Handler] = {
    f"{router.prefix}/shopify": shopify_webhook,
    f"{router.prefix}/square": square_webhook,
}


async def serve_fast(handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
    """Run one webhook handler as a bare ASGI app (errors rendered like api/errors.py)."""
    started = time.perf_counter()
    request_id = request_id_of(scope)
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        try:
            response = await handler(Request(scope, receive))
        except ApiError as exc:
            response = JSONResponse(
                {"error": exc.message}, status_code=exc.status, headers=exc.headers
            )
        except Exception as exc:
            log.exception("api.unhandled_error", error_type=type(exc).__name__)
            response = JSONResponse({"error": "internal server error"}, status_code=500)
        response.headers["x-request-id"] = request_id
        try:
            await response(scope, receive, send)
        finally:
            log_request(scope, response.status_code, started)
