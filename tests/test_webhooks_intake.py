"""Webhook intake (`POST /webhooks/shopify`, `POST /webhooks/square`) on SQLite and PostgreSQL.

Signatures are checked against the official SDK vectors in tests/data/vectors.json (every pass
and every negative case), then the inbox rows are read back from the database: what a 200 says
is stored must be stored, and a 401 must store nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from api.app import create_app
from api.intake import RouteCache
from models import inbox
from models.connections import connect
from models.crypto import derive_key
from models.inbox import Delivery
from models.tables import WebhookEvent
from worker.settings import Settings

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "vectors.json").read_text()
)["vectors"]
SAMPLES: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "vectors.json").read_text())[
    "samples"
]
SHOPIFY_VECTORS = [
    v for v in VECTORS if v["provider"] == "shopify" and v["kind"] == "webhook_signature"
]
SQUARE_VECTORS = [
    v for v in VECTORS if v["provider"] == "square" and v["kind"] == "webhook_signature"
]

SECRET = "shpss_current_secret_0123456789"
OLD_SECRET = "shpss_previous_secret_9876543210"
SQUARE_KEY = "sq0wss-signature-key-ABCDEF"
SQUARE_URL = "https://hooks.example.com/webhooks/square"
SHOP = "demo-shop.myshopify.com"
MERCHANT = "G7MMEBVW021Q4"
KEY = derive_key("test")


# --- helpers --------------------------------------------------------------------------------------


def shopify_signature(body: bytes, secret: str = SECRET) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def square_signature(body: bytes, key: str = SQUARE_KEY, url: str = SQUARE_URL) -> str:
    mac = hmac.new(key.encode(), url.encode() + body, hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def shopify_headers(
    body: bytes,
    *,
    topic: str = "customers/update",
    shop: str = SHOP,
    webhook_id: str | None = "wh-1",
    secret: str = SECRET,
    prefix: str = "X-Shopify-",
    **extra: str,
) -> dict[str, str]:
    headers = {
        f"{prefix}Topic": topic,
        f"{prefix}Hmac-Sha256": shopify_signature(body, secret),
        f"{prefix}Shop-Domain": shop,
        f"{prefix}API-Version": "2026-10",
        f"{prefix}Triggered-At": "2026-11-22T06:00:00.123456789Z",
        f"{prefix}Event-Id": "ev-1",
        "Content-Type": "application/json",
    }
    if webhook_id is not None:
        headers[f"{prefix}Webhook-Id"] = webhook_id
    headers.update(extra)
    return headers


def customer_body(customer_id: int = 1, **fields: Any) -> bytes:
    payload = {"id": customer_id, "email": f"c{customer_id}@example.com", **fields}
    return json.dumps(payload).encode()


def square_body(event_id: str = "ev-sq-1", type_: str = "customer.updated", **fields: Any) -> bytes:
    payload = {
        "merchant_id": MERCHANT,
        "type": type_,
        "event_id": event_id,
        "created_at": "2022-11-09T21:38:29Z",
        "data": {"type": "customer", "id": "A0AP25A6SCVTH8JES9BX01GXM4"},
        **fields,
    }
    return json.dumps(payload).encode()


def rows(engine: Engine) -> list[WebhookEvent]:
    with Session(engine) as s:
        return list(s.scalars(select(WebhookEvent).order_by(WebhookEvent.id)))


def settings_for(db_url: str, **env: Any) -> Settings:
    values: dict[str, Any] = {
        "DATABASE_URL": db_url,
        "SHOPIFY_API_SECRETS": SECRET,
        "SQUARE_WEBHOOK_URL": SQUARE_URL,
        "SQUARE_WEBHOOK_SIGNATURE_KEY": SQUARE_KEY,
        "WEBHOOK_ROUTE_CACHE_SECONDS": 0,
    }
    values.update(env)
    return Settings(**values)


@contextmanager
def intake_client(engine: Engine, db_url: str, **env: Any) -> Iterator[TestClient]:
    app = create_app(settings_for(db_url, **env), engine=engine)
    with TestClient(app) as c:
        yield c


@pytest.fixture
def wh(engine: Engine, db_url: str) -> Iterator[TestClient]:
    with intake_client(engine, db_url) as c:
        yield c


@pytest.fixture
def connected(engine: Engine, make_store: Callable[..., tuple[int, str]]) -> dict[str, int]:
    """A store connected to the Shopify shop `SHOP` and the Square merchant `MERCHANT`."""
    store_id, _ = make_store()
    ids = {"store_id": store_id}
    with Session(engine) as s:
        for source, account in (("shopify", SHOP), ("square", MERCHANT)):
            row, _ = connect(
                s,
                store_id=store_id,
                source=source,
                account=account,
                access_token="tok",
                api_base_url=None,
                api_version=None,
                key=KEY,
            )
            s.flush()
            ids[source] = row.id
        s.commit()
    return ids


# --- SDK vectors ----------------------------------------------------------------------------------


def _vector_headers(vector: dict[str, Any], signature: str) -> dict[str, str]:
    # Header names as the SDK tests send them (js: title case; ruby: lower case).
    ruby = vector["id"].endswith("ruby_derived")
    name = "x-shopify-hmac-sha256" if ruby else "X-Shopify-Hmac-Sha256"
    return {
        name: signature,
        "X-Shopify-Topic": "products/create",
        "X-Shopify-Shop-Domain": "shop1.myshopify.io",
        "X-Shopify-API-Version": "2023-01",
        "X-Shopify-Webhook-Id": f"vector-{vector['id']}",
    }


@pytest.mark.parametrize("vector", SHOPIFY_VECTORS, ids=lambda v: v["id"])
def test_shopify_sdk_vectors_verify(engine: Engine, db_url: str, vector: dict[str, Any]) -> None:
    assert vector["expected_valid"] is True
    body = vector["raw_body"].encode()
    with intake_client(engine, db_url, SHOPIFY_API_SECRETS=vector["secret"]) as c:
        r = c.post(
            "/webhooks/shopify",
            content=body,
            headers=_vector_headers(vector, vector["expected_signature"]),
        )
    assert r.status_code == 200, r.text
    # products/create from an unknown shop: stored, but not for processing.
    assert r.json() == {"status": "ignored"}
    [row] = rows(engine)
    assert (row.source, row.status, row.body) == ("shopify", "ignored", vector["raw_body"])
    assert row.dedupe_key == f"vector-{vector['id']}"
    assert row.account == "shop1.myshopify.io"


def _shopify_negatives(vector: dict[str, Any]) -> list[tuple[str, bytes, str | None]]:
    body = vector["raw_body"].encode()
    good = vector["expected_signature"]
    digest = base64.b64decode(good)
    return [
        ("wrong_secret", body, shopify_signature(body, vector["secret"] + "x")),
        ("body_changed", body + b" ", good),
        ("body_reserialised", json.dumps(json.loads(body)).encode() + b"\n", good),
        ("missing_header", body, None),
        ("empty_header", body, ""),
        ("truncated", body, good[:-4]),
        ("hex_not_base64", body, digest.hex()),
        ("sha1_length", body, base64.b64encode(digest[:20]).decode()),
    ]


@pytest.mark.parametrize("vector", SHOPIFY_VECTORS, ids=lambda v: v["id"])
def test_shopify_negative_cases_are_401_and_store_nothing(
    engine: Engine, db_url: str, vector: dict[str, Any]
) -> None:
    with intake_client(engine, db_url, SHOPIFY_API_SECRETS=vector["secret"]) as c:
        for case, body, signature in _shopify_negatives(vector):
            headers = _vector_headers(vector, signature or "")
            if signature is None:
                headers = {k: v for k, v in headers.items() if "hmac" not in k.lower()}
            r = c.post("/webhooks/shopify", content=body, headers=headers)
            assert r.status_code == 401, (case, r.text)
            assert r.json() == {"error": "invalid webhook signature"}
        # Another SDK's (valid) signature for another secret doesn't verify here either.
        for other in SHOPIFY_VECTORS:
            if other["secret"] == vector["secret"]:
                continue
            r = c.post(
                "/webhooks/shopify",
                content=other["raw_body"].encode(),
                headers=_vector_headers(other, other["expected_signature"]),
            )
            assert r.status_code == 401
    assert rows(engine) == []


@pytest.mark.parametrize("vector", SQUARE_VECTORS, ids=lambda v: v["id"])
def test_square_sdk_vectors(engine: Engine, db_url: str, vector: dict[str, Any]) -> None:
    env = {
        "SQUARE_WEBHOOK_URL": vector["notification_url"],
        "SQUARE_WEBHOOK_SIGNATURE_KEY": vector["signature_key"],
    }
    signature = vector.get("expected_signature") or vector["signature_header"]
    with intake_client(engine, db_url, **env) as c:
        r = c.post(
            "/webhooks/square",
            content=vector["raw_body"].encode(),
            headers={"X-Square-HmacSha256-Signature": signature},
        )
    if vector["expected_valid"]:
        assert r.status_code == 200, r.text
        # A test notification / a body without merchant: stored, not for processing.
        assert r.json() == {"status": "ignored"}
        [row] = rows(engine)
        assert (row.source, row.status, row.body) == ("square", "ignored", vector["raw_body"])
        payload = json.loads(vector["raw_body"])
        if "event_id" in payload:
            assert row.dedupe_key == payload["event_id"] == row.event_id
            assert row.account == payload["merchant_id"]
            assert row.topic == payload["type"]
            assert row.triggered_at == dt.datetime(2022, 7, 13, 20, 30, 59, 37339, tzinfo=dt.UTC)
        else:
            # No event id: deduplicated on the body's hash.
            digest = hashlib.sha256(vector["raw_body"].encode()).hexdigest()
            assert row.dedupe_key == f"sha256:{digest}"
    else:
        assert r.status_code == 401, r.text
        assert rows(engine) == []


def test_square_negative_variants(engine: Engine, db_url: str) -> None:
    [vector] = [v for v in SQUARE_VECTORS if v["id"] == "square_webhook_v2_pass"]
    body, good = vector["raw_body"].encode(), vector["expected_signature"]
    env = {
        "SQUARE_WEBHOOK_URL": vector["notification_url"],
        "SQUARE_WEBHOOK_SIGNATURE_KEY": vector["signature_key"],
    }
    with intake_client(engine, db_url, **env) as c:
        cases: list[tuple[bytes, dict[str, str]]] = [
            (body, {}),
            (body, {"x-square-hmacsha256-signature": ""}),
            (body, {"x-square-signature": good}),  # the legacy SHA-1 header is not accepted
            (b"", {"x-square-hmacsha256-signature": square_signature(b"", **_sq(vector))}),
            (body + b"\n", {"x-square-hmacsha256-signature": good}),
        ]
        for content, headers in cases:
            r = c.post("/webhooks/square", content=content, headers=headers)
            assert r.status_code == 401, (headers, r.text)
        # Lower- and mixed-case header names verify the same.
        for name in ("x-square-hmacsha256-signature", "X-SQUARE-HMACSHA256-SIGNATURE"):
            r = c.post("/webhooks/square", content=body, headers={name: good})
            assert r.status_code == 200, r.text
    assert len(rows(engine)) == 1  # the second was a duplicate of the first


def _sq(vector: dict[str, Any]) -> dict[str, str]:
    return {"key": vector["signature_key"], "url": vector["notification_url"]}


# --- Shopify semantics --------------------------------------------------------------------------


def test_shopify_accepted_row_keeps_the_delivery(
    wh: TestClient, engine: Engine, connected: dict[str, int]
) -> None:
    body = customer_body(7, first_name="Ada")
    r = wh.post("/webhooks/shopify", content=body, headers=shopify_headers(body, shop=SHOP.upper()))
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "accepted"}
    [row] = rows(engine)
    assert row.status == "pending"
    assert (row.source, row.dedupe_key, row.topic, row.event_id) == (
        "shopify",
        "wh-1",
        "customers/update",
        "ev-1",
    )
    assert (row.store_id, row.connection_id) == (connected["store_id"], connected["shopify"])
    assert row.account == SHOP  # lower-cased
    assert row.api_version == "2026-10"
    assert row.triggered_at == dt.datetime(2026, 11, 22, 6, 0, 0, 123456, tzinfo=dt.UTC)
    assert row.body == body.decode()
    assert row.attempts == 0
    assert row.last_error is None
    assert row.received_at <= dt.datetime.now(dt.UTC)
    assert row.next_attempt_at == row.received_at
    assert row.headers["x-shopify-topic"] == "customers/update"
    assert row.headers["x-shopify-webhook-id"] == "wh-1"
    assert row.headers["content-type"] == "application/json"
    assert not any("hmac" in name for name in row.headers)
    assert shopify_signature(body) not in json.dumps(row.headers)


def test_shopify_header_spellings(
    wh: TestClient, engine: Engine, connected: dict[str, int]
) -> None:
    prefixes = ["x-shopify-", "shopify-", "X-SHOPIFY-", "Shopify-"]
    for i, prefix in enumerate(prefixes):
        body = customer_body(i)
        headers = shopify_headers(body, prefix=prefix, webhook_id=f"sp-{i}")
        r = wh.post("/webhooks/shopify", content=body, headers=headers)
        assert r.json() == {"status": "accepted"}, prefix
    stored = rows(engine)
    assert [(r.topic, r.dedupe_key, r.account, r.api_version, r.event_id) for r in stored] == [
        ("customers/update", f"sp-{i}", SHOP, "2026-10", "ev-1") for i in range(len(prefixes))
    ]
    assert all(r.triggered_at is not None for r in stored)


def test_shopify_secret_rotation(engine: Engine, db_url: str, connected: dict[str, int]) -> None:
    with intake_client(engine, db_url, SHOPIFY_API_SECRETS=f" {SECRET} , {OLD_SECRET} ,") as c:
        for i, secret in enumerate((OLD_SECRET, SECRET)):
            body = customer_body(i)
            headers = shopify_headers(body, webhook_id=f"rot-{i}", secret=secret)
            assert c.post("/webhooks/shopify", content=body, headers=headers).json() == {
                "status": "accepted"
            }
        body = customer_body(9)
        headers = shopify_headers(body, webhook_id="rot-9", secret="retired-secret")
        assert c.post("/webhooks/shopify", content=body, headers=headers).status_code == 401
    assert [r.dedupe_key for r in rows(engine)] == ["rot-0", "rot-1"]


def test_shopify_handled_topics_are_accepted(
    wh: TestClient, engine: Engine, connected: dict[str, int]
) -> None:
    topics = sorted(inbox.SHOPIFY_TOPICS)
    assert len(topics) == 11
    for topic in topics:
        body = customer_body(3)
        headers = shopify_headers(body, topic=topic, webhook_id=topic)
        r = wh.post("/webhooks/shopify", content=body, headers=headers)
        assert r.json() == {"status": "accepted"}, topic
    assert [(r.topic, r.status) for r in rows(engine)] == [(t, "pending") for t in topics]


def test_shopify_other_topics_and_unknown_shops_are_stored_as_ignored(
    wh: TestClient, engine: Engine, connected: dict[str, int]
) -> None:
    cases = [
        ("orders/create", SHOP),
        ("customers/update", "other-shop.myshopify.com"),
    ]
    for i, (topic, shop) in enumerate(cases):
        body = customer_body(i)
        headers = shopify_headers(body, topic=topic, shop=shop, webhook_id=f"ign-{i}")
        r = wh.post("/webhooks/shopify", content=body, headers=headers)
        assert r.json() == {"status": "ignored"}
    # No shop header at all: nowhere to route it.
    body = customer_body(5)
    headers = shopify_headers(body, webhook_id="ign-x")
    del headers["X-Shopify-Shop-Domain"]
    assert wh.post("/webhooks/shopify", content=body, headers=headers).json() == {
        "status": "ignored"
    }
    stored = rows(engine)
    assert [(r.dedupe_key, r.status) for r in stored] == [
        ("ign-0", "ignored"),
        ("ign-1", "ignored"),
        ("ign-x", "ignored"),
    ]
    # The known shop's row still names its connection; the unknown one names none.
    assert stored[0].connection_id == connected["shopify"]
    assert stored[1].connection_id is None
    assert stored[1].store_id is None
    assert "no connection" in (stored[1].last_error or "")
    assert "not handled" in (stored[0].last_error or "")


def test_disabled_connection_is_not_routed(
    wh: TestClient, engine: Engine, connected: dict[str, int]
) -> None:
    from models.tables import Connection

    with Session(engine) as s:
        row = s.get(Connection, connected["shopify"])
        assert row is not None
        row.enabled = False
        s.commit()
    body = customer_body(1)
    r = wh.post("/webhooks/shopify", content=body, headers=shopify_headers(body))
    assert r.json() == {"status": "ignored"}


def test_shopify_duplicates(wh: TestClient, engine: Engine, connected: dict[str, int]) -> None:
    body = customer_body(1)
    headers = shopify_headers(body)
    assert wh.post("/webhooks/shopify", content=body, headers=headers).json() == {
        "status": "accepted"
    }
    for _ in range(2):
        r = wh.post("/webhooks/shopify", content=body, headers=headers)
        assert r.status_code == 200
        assert r.json() == {"status": "duplicate"}
    # Without a webhook id: the event id (per topic) is the key…
    other = customer_body(2)
    h = shopify_headers(other, webhook_id=None, **{"X-Shopify-Event-Id": "ev-77"})
    assert wh.post("/webhooks/shopify", content=other, headers=h).json()["status"] == "accepted"
    assert wh.post("/webhooks/shopify", content=other, headers=h).json()["status"] == "duplicate"
    h2 = shopify_headers(other, webhook_id=None, topic="customers/create")
    h2["X-Shopify-Event-Id"] = "ev-77"  # same merchant action, another topic: not a duplicate
    assert wh.post("/webhooks/shopify", content=other, headers=h2).json()["status"] == "accepted"
    # …and without either, the body's SHA-256.
    third = customer_body(3)
    h3 = {k: v for k, v in shopify_headers(third, webhook_id=None).items() if "Event-Id" not in k}
    assert wh.post("/webhooks/shopify", content=third, headers=h3).json()["status"] == "accepted"
    assert wh.post("/webhooks/shopify", content=third, headers=h3).json()["status"] == "duplicate"
    keys = [r.dedupe_key for r in rows(engine)]
    digest = hashlib.sha256(third).hexdigest()
    assert keys == [
        "wh-1",
        "event:customers/update:ev-77",
        "event:customers/create:ev-77",
        f"sha256:customers/update:{digest}",
    ]


def test_signed_garbage_is_400_and_stored_invalid(
    wh: TestClient, engine: Engine, connected: dict[str, int]
) -> None:
    bodies = [b"{not json", b"[1, 2]", b"", b"\xff\xfe{}", b'{"a": "\x00"}']
    for i, body in enumerate(bodies):
        headers = shopify_headers(body, webhook_id=f"bad-{i}")
        r = wh.post("/webhooks/shopify", content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith("unparseable webhook body")
        # A resend is still a 400, and still one row.
        assert wh.post("/webhooks/shopify", content=body, headers=headers).status_code == 400
    stored = rows(engine)
    assert [r.status for r in stored] == ["invalid"] * len(bodies)
    assert [r.dedupe_key for r in stored] == [f"bad-{i}" for i in range(len(bodies))]
    # Nothing lost: text as is, undecodable bytes base64-encoded (and said so).
    assert stored[0].body == "{not json"
    assert base64.b64decode(stored[3].body) == b"\xff\xfe{}"
    assert base64.b64decode(stored[4].body) == b'{"a": "\x00"}'
    assert "base64" in (stored[3].last_error or "")
    assert all(r.last_error for r in stored)

    body = b"<xml/>"
    headers = {"x-square-hmacsha256-signature": square_signature(body)}
    r = wh.post("/webhooks/square", content=body, headers=headers)
    assert r.status_code == 400
    [sq] = [r for r in rows(engine) if r.source == "square"]
    assert (sq.status, sq.body) == ("invalid", "<xml/>")


# --- Square semantics ---------------------------------------------------------------------------


def test_square_deliveries(wh: TestClient, engine: Engine, connected: dict[str, int]) -> None:
    def post(payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload).encode()
        headers = {"X-Square-HmacSha256-Signature": square_signature(body)}
        r = wh.post("/webhooks/square", content=body, headers=headers)
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    for name in ("created", "updated", "deleted"):
        assert post(SAMPLES[f"square_webhook_customer_{name}"]["json"]) == {"status": "accepted"}
    assert post(SAMPLES["square_webhook_customer_updated"]["json"]) == {"status": "duplicate"}
    assert post(SAMPLES["square_webhook_order_updated"]["json"]) == {"status": "ignored"}
    unknown = dict(SAMPLES["square_webhook_customer_updated"]["json"], event_id="x-1")
    unknown["merchant_id"] = "SOMEONE_ELSE"
    assert post(unknown) == {"status": "ignored"}

    stored = rows(engine)
    assert [(r.topic, r.status) for r in stored] == [
        ("customer.created", "pending"),
        ("customer.updated", "pending"),
        ("customer.deleted", "pending"),
        ("order.updated", "ignored"),
        ("customer.updated", "ignored"),
    ]
    created = stored[0]
    sample = SAMPLES["square_webhook_customer_created"]["json"]
    assert created.dedupe_key == created.event_id == sample["event_id"]
    assert (created.store_id, created.connection_id) == (
        connected["store_id"],
        connected["square"],
    )
    assert created.account == MERCHANT
    assert created.triggered_at == dt.datetime(2022, 11, 9, 21, 23, 25, tzinfo=dt.UTC)
    assert json.loads(created.body) == sample


def test_hostile_field_values_are_stored_not_fatal(
    wh: TestClient, engine: Engine, connected: dict[str, int]
) -> None:
    """NULs, lone surrogates, huge strings and odd types in routed fields never break a batch."""
    payloads = [
        '{"merchant_id": "G7MM\\u0000", "event_id": "e\\ud800", "type": "customer.updated"}',
        json.dumps({"merchant_id": ["x"], "event_id": "e" * 5000, "type": {"a": 1}}),
        json.dumps({"merchant_id": MERCHANT, "event_id": 42, "type": "customer.created"}),
    ]
    for raw in payloads:
        body = raw.encode()
        headers = {"X-Square-HmacSha256-Signature": square_signature(body)}
        r = wh.post("/webhooks/square", content=body, headers=headers)
        assert r.status_code == 200, r.text
    stored = rows(engine)
    assert len(stored) == 3
    assert stored[0].account == "G7MM"
    assert len(stored[1].dedupe_key) <= 255
    assert (stored[2].event_id, stored[2].status) == ("42", "pending")
    long = "x" * 2000
    body = customer_body(1)
    headers = shopify_headers(body, topic=long, shop=long, webhook_id=long)
    assert wh.post("/webhooks/shopify", content=body, headers=headers).status_code == 200


# --- size cap, disabled endpoints ---------------------------------------------------------------


def test_size_cap(engine: Engine, db_url: str, connected: dict[str, int]) -> None:
    cap = 2048
    with intake_client(engine, db_url, WEBHOOK_MAX_BYTES=cap) as c:
        exact = customer_body(1, note="x" * (cap - len(customer_body(1, note=""))))
        assert len(exact) == cap
        r = c.post("/webhooks/shopify", content=exact, headers=shopify_headers(exact))
        assert r.json() == {"status": "accepted"}
        over = exact + b" "
        headers = shopify_headers(over, webhook_id="big")
        r = c.post("/webhooks/shopify", content=over, headers=headers)
        assert r.status_code == 413
        # Declared too large: refused before reading.
        r = c.post(
            "/webhooks/shopify",
            content=b"{}",
            headers={**shopify_headers(b"{}", webhook_id="liar"), "Content-Length": "999999"},
        )
        assert r.status_code == 413

        # No Content-Length (chunked): counted while streaming.
        def chunks() -> Iterator[bytes]:
            for _ in range(10):
                yield b"x" * 1000

        streamed = b"x" * 10_000
        request = c.build_request(
            "POST", "/webhooks/shopify", content=chunks(), headers=shopify_headers(streamed)
        )
        assert "content-length" not in request.headers
        r = c.send(request)
        assert r.status_code == 413
        assert r.json() == {"error": f"body larger than {cap} bytes"}
        sq = square_body() + b" " * cap
        r = c.post(
            "/webhooks/square",
            content=sq,
            headers={"x-square-hmacsha256-signature": square_signature(sq)},
        )
        assert r.status_code == 413
    assert [r.dedupe_key for r in rows(engine)] == ["wh-1"]


def test_default_cap_is_one_mib() -> None:
    assert Settings().webhook_max_bytes == 1024 * 1024


def test_empty_secret_disables_the_endpoint(engine: Engine, db_url: str) -> None:
    body = b"{}"
    headers = {
        "X-Shopify-Hmac-Sha256": shopify_signature(body, ""),
        "X-Shopify-Webhook-Id": "w",
        "x-square-hmacsha256-signature": square_signature(body, key="", url=""),
    }
    cases = [
        ({"SHOPIFY_API_SECRETS": ""}, "/webhooks/shopify"),
        ({"SHOPIFY_API_SECRETS": " , "}, "/webhooks/shopify"),
        ({"SQUARE_WEBHOOK_SIGNATURE_KEY": ""}, "/webhooks/square"),
        ({"SQUARE_WEBHOOK_URL": ""}, "/webhooks/square"),
    ]
    for env, path in cases:
        with intake_client(engine, db_url, **env) as c:
            r = c.post(path, content=body, headers=headers)
            assert r.status_code == 404, env
            assert r.json() == {"error": "Not found"}
    assert rows(engine) == []


def test_defaults_disable_both_endpoints(client: TestClient) -> None:
    assert client.post("/webhooks/shopify", content=b"{}").status_code == 404
    assert client.post("/webhooks/square", content=b"{}").status_code == 404


# --- 401 logging, failures ----------------------------------------------------------------------


def test_rejected_signatures_are_logged_without_secrets(wh: TestClient, engine: Engine) -> None:
    body = customer_body(1)
    bad = shopify_signature(body, "forged")
    headers = shopify_headers(body)
    headers["X-Shopify-Hmac-Sha256"] = bad
    sq_bad = square_signature(body, key="forged")
    with structlog.testing.capture_logs() as logs:
        assert wh.post("/webhooks/shopify", content=body, headers=headers).status_code == 401
        missing = {k: v for k, v in headers.items() if "Hmac" not in k}
        assert wh.post("/webhooks/shopify", content=body, headers=missing).status_code == 401
        r = wh.post(
            "/webhooks/square", content=body, headers={"x-square-hmacsha256-signature": sq_bad}
        )
        assert r.status_code == 401
    events = [e for e in logs if e["event"] == "webhook.unauthorized"]
    assert [(e["source"], e["reason"], e["rejected_total"]) for e in events] == [
        ("shopify", "bad_signature", 1),
        ("shopify", "missing_signature", 2),
        ("square", "bad_signature", 1),
    ]
    assert events[0]["account"] == SHOP
    assert all(e["log_level"] == "warning" for e in events)
    dumped = json.dumps(logs, default=str)
    for secret in (SECRET, SQUARE_KEY, bad, sq_bad, shopify_signature(body)):
        assert secret not in dumped
    assert wh.app.state.intake.rejected == {  # type: ignore[attr-defined]
        "shopify.bad_signature": 1,
        "shopify.missing_signature": 1,
        "square.bad_signature": 1,
    }
    assert rows(engine) == []


def test_a_failed_batch_is_503_and_the_writer_keeps_serving(
    wh: TestClient, engine: Engine, connected: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = inbox.insert_batch
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("INSERT", {}, Exception("database is down"))
        return real(*args, **kwargs)

    monkeypatch.setattr(inbox, "insert_batch", flaky)
    body = customer_body(1)
    r = wh.post("/webhooks/shopify", content=body, headers=shopify_headers(body))
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"
    assert rows(engine) == []
    # Shopify retries: now it is stored, and accepted (not a duplicate of a lost row).
    r = wh.post("/webhooks/shopify", content=body, headers=shopify_headers(body))
    assert r.json() == {"status": "accepted"}
    assert len(rows(engine)) == 1
    writer = wh.app.state.intake  # type: ignore[attr-defined]
    assert (writer.failed_batches, writer.batches) == (1, 1)


def test_route_cache_reuses_lookups_for_its_ttl(
    engine: Engine, connected: dict[str, int], make_store: Callable[..., tuple[int, str]]
) -> None:
    now = [100.0]
    cache = RouteCache(ttl=5.0, clock=lambda: now[0])
    known = Delivery(source="shopify", dedupe_key="a", body="{}", account=SHOP)
    unknown = Delivery(source="shopify", dedupe_key="b", body="{}", account="new.myshopify.com")
    with engine.begin() as conn:
        routes = cache.resolve(conn, [known, unknown, known])
        assert routes[("shopify", SHOP)] == inbox.Route(connected["store_id"], connected["shopify"])
        assert routes[("shopify", "new.myshopify.com")] is None
        assert cache.lookups == 1
        cache.resolve(conn, [known, unknown])
        assert cache.lookups == 1  # both answers (hit and miss) reused
    store_id, _ = make_store()
    with Session(engine) as s:
        connect(
            s,
            store_id=store_id,
            source="shopify",
            account="new.myshopify.com",
            access_token="t",
            api_base_url=None,
            api_version=None,
            key=KEY,
        )
        s.commit()
    now[0] += 6
    with engine.begin() as conn:
        routes = cache.resolve(conn, [unknown])
    assert cache.lookups == 2
    assert routes[("shopify", "new.myshopify.com")] is not None


def test_a_shop_connected_to_two_stores_is_pending_without_ids(
    wh: TestClient, engine: Engine, connected: dict[str, int], make_store: Callable[..., Any]
) -> None:
    store_id, _ = make_store()
    with Session(engine) as s:
        connect(
            s,
            store_id=store_id,
            source="shopify",
            account=SHOP,
            access_token="t",
            api_base_url=None,
            api_version=None,
            key=KEY,
        )
        s.commit()
    body = customer_body(1)
    assert wh.post("/webhooks/shopify", content=body, headers=shopify_headers(body)).json() == {
        "status": "accepted"
    }
    [row] = rows(engine)
    assert (row.status, row.store_id, row.connection_id, row.account) == (
        "pending",
        None,
        None,
        SHOP,
    )


def test_insert_batch_outcomes(engine: Engine, connected: dict[str, int]) -> None:
    """One statement per batch: first of a key wins, in-batch and stored keys are duplicates."""

    def d(key: str, **kw: Any) -> Delivery:
        fields: dict[str, Any] = {"topic": "customers/update", "account": SHOP, **kw}
        return Delivery(source="shopify", dedupe_key=key, body="{}", **fields)

    route = inbox.Route(connected["store_id"], connected["shopify"])
    routes = {("shopify", SHOP): route}
    with engine.begin() as conn:
        assert inbox.insert_batch(conn, [d("old")], routes) == (["accepted"], 1)
    batch = [
        d("a"),
        d("a"),
        d("old"),
        d("b", topic="orders/create"),
        d("c", invalid_reason="body is not JSON"),
        Delivery(source="square", dedupe_key="a", body="{}", topic="customer.created"),
        d("b"),
    ]
    with engine.begin() as conn:
        outcomes, new_pending = inbox.insert_batch(conn, batch, routes)
    assert outcomes == [
        "accepted",
        "duplicate",
        "duplicate",
        "ignored",
        "invalid",
        "ignored",  # Square without a merchant: nowhere to route it
        "duplicate",
    ]
    assert new_pending == 1
    stored = {(r.source, r.dedupe_key): r.status for r in rows(engine)}
    assert stored == {
        ("shopify", "old"): "pending",
        ("shopify", "a"): "pending",
        ("shopify", "b"): "ignored",
        ("shopify", "c"): "invalid",
        ("square", "a"): "ignored",
    }
