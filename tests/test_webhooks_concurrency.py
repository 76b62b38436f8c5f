"""Group commit under concurrency: many deliveries at once, 30% of them duplicates.

Exactly the unique deliveries are stored, every request gets its 200 with the right status, and
the writer needs far fewer transactions than there were requests. Once through the ASGI app with
`asyncio.gather`, once through a real uvicorn server on 127.0.0.1 with client threads.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine

from api.app import create_app
from api.intake import IntakeUnavailable, IntakeWriter
from models.inbox import Delivery
from tests.test_webhooks_intake import (
    MERCHANT,
    SHOP,
    connected,  # noqa: F401 - fixture
    customer_body,
    rows,
    settings_for,
    shopify_headers,
    square_body,
    square_signature,
)

Request = tuple[str, bytes, dict[str, str], str]  # path, body, headers, dedupe key


def deliveries(unique: int, duplicate_share: float, seed: int = 7) -> list[Request]:
    """`unique` distinct deliveries (Shopify and Square mixed) plus redeliveries of some of them,
    so that `duplicate_share` of all requests are duplicates; shuffled."""
    rng = random.Random(seed)
    originals: list[Request] = []
    for i in range(unique):
        if i % 4 == 3:
            body = square_body(event_id=f"sq-{i}", type_="customer.updated")
            headers = {"x-square-hmacsha256-signature": square_signature(body)}
            originals.append(("/webhooks/square", body, headers, f"sq-{i}"))
        else:
            body = customer_body(i, first_name=f"N{i}")
            headers = shopify_headers(body, webhook_id=f"wh-{i}")
            originals.append(("/webhooks/shopify", body, headers, f"wh-{i}"))
    extra = round(unique * duplicate_share / (1 - duplicate_share))
    all_requests = originals + [rng.choice(originals) for _ in range(extra)]
    rng.shuffle(all_requests)
    return all_requests


def check(
    engine: Engine, requests: list[Request], answers: list[tuple[int, dict[str, Any]]]
) -> None:
    assert all(code == 200 for code, _ in answers), Counter(code for code, _ in answers)
    by_key: dict[str, list[str]] = {}
    for (_, _, _, key), (_, body) in zip(requests, answers, strict=True):
        by_key.setdefault(key, []).append(body["status"])
    # Each key: accepted exactly once, every redelivery a duplicate.
    for key, statuses in by_key.items():
        assert sorted(statuses) == ["accepted"] + ["duplicate"] * (len(statuses) - 1), key
    stored = rows(engine)
    assert sorted(r.dedupe_key for r in stored) == sorted(by_key)
    assert {r.status for r in stored} == {"pending"}
    assert {r.account for r in stored} == {SHOP, MERCHANT}


def test_200_concurrent_deliveries_share_commits(
    engine: Engine,
    db_url: str,
    connected: dict[str, int],  # noqa: F811
) -> None:
    requests = deliveries(unique=140, duplicate_share=0.3)
    assert len(requests) == 200
    committed: list[int] = []
    # Production defaults for batching and the route cache.
    settings = settings_for(db_url, WEBHOOK_ROUTE_CACHE_SECONDS=5)
    app = create_app(settings, engine=engine, on_webhooks_committed=committed.append)

    async def run() -> list[tuple[int, dict[str, Any]]]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://intake") as client,
        ):

            async def one(req: Request) -> tuple[int, dict[str, Any]]:
                path, body, headers, _ = req
                r = await client.post(path, content=body, headers=headers)
                return r.status_code, r.json()

            return await asyncio.gather(*(one(req) for req in requests))

    answers = asyncio.run(run())
    check(engine, requests, answers)
    writer: IntakeWriter = app.state.intake
    assert writer.deliveries == len(requests)
    assert writer.failed_batches == 0
    assert writer.routes.lookups <= 2  # one per source, then cached
    assert 1 <= writer.batches < len(requests) // 4, writer.batches
    # The wake-up seam saw every new pending row once, batch by batch.
    assert sum(committed) == 140
    assert len(committed) <= writer.batches


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """The app under a real uvicorn server on a free 127.0.0.1 port (its own thread)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,
        lifespan="on",
        http="h11",
        ws="none",
        loop="asyncio",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        assert time.monotonic() < deadline, "uvicorn did not start in time"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_real_server_with_client_threads(
    engine: Engine,
    db_url: str,
    connected: dict[str, int],  # noqa: F811
) -> None:
    requests = deliveries(unique=105, duplicate_share=0.3, seed=11)
    app = create_app(settings_for(db_url, WEBHOOK_MAX_BYTES=4096), engine=engine)
    with serve(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:

        def one(req: Request) -> tuple[int, dict[str, Any]]:
            path, body, headers, _ = req
            r = client.post(path, content=body, headers=headers)
            return r.status_code, r.json()

        with ThreadPoolExecutor(max_workers=32) as pool:
            answers = list(pool.map(one, requests))

        # Over the cap without Content-Length (chunked): refused while streaming, nothing kept.
        def chunks() -> Iterator[bytes]:
            for _ in range(8):
                yield b"x" * 1024

        big = b"x" * 8192
        r = client.post(
            "/webhooks/shopify", content=chunks(), headers=shopify_headers(big, webhook_id="big")
        )
        assert r.status_code == 413
        assert json.loads(r.content) == {"error": "body larger than 4096 bytes"}
    check(engine, requests, answers)
    writer: IntakeWriter = app.state.intake
    assert writer.batches < len(requests), writer.batches


def test_the_writer_follows_the_event_loop(
    engine: Engine,
    connected: dict[str, int],  # noqa: F811
) -> None:
    """Started, used and stopped from three different event loops (as some ASGI test clients
    do): requests are still committed and answered, and stop() does not hang or raise."""
    writer = IntakeWriter(engine, route_ttl=0)
    asyncio.run(writer.start())

    def delivery(key: str) -> Delivery:
        body = customer_body(1).decode()
        return Delivery(
            source="shopify", dedupe_key=key, body=body, topic="customers/update", account=SHOP
        )

    async def submit_two() -> list[str]:
        return list(
            await asyncio.gather(writer.submit(delivery("a")), writer.submit(delivery("a")))
        )

    assert sorted(asyncio.run(submit_two())) == ["accepted", "duplicate"]
    assert asyncio.run(writer.submit(delivery("b"))) == "accepted"
    asyncio.run(writer.stop())
    with pytest.raises(IntakeUnavailable):
        asyncio.run(writer.submit(delivery("c")))
    assert sorted(r.dedupe_key for r in rows(engine)) == ["a", "b"]
