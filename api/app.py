"""FastAPI application factory (an edge: reads settings, builds the engine)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Engine, text
from starlette.types import Receive, Scope, Send

from api import errors
from api.deps import on_outbox_commit
from api.intake import IntakeWriter
from api.middleware import RequestContextMiddleware
from api.routes import customer_cards, customers, webhooks
from models.db import make_engine, make_sessionmaker
from worker import metrics, metrics_db
from worker.settings import Settings


class LoyaltyApp(FastAPI):
    """FastAPI, plus a fast path: the webhook intake routes (`webhooks.FAST_ROUTES`) are served
    as bare ASGI handlers, outside FastAPI's routing and middleware stack — the same handlers,
    answers, request-id header and log line, at a fraction of the cost per delivery."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = webhooks.FAST_ROUTES.get(scope["path"])
            if handler is not None and not self.root_path:
                scope["app"] = self
                await webhooks.serve_fast(handler, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    on_webhooks_committed: Callable[[int], None] | None = None,
    on_outbox_committed: Callable[[], None] | None = None,
) -> FastAPI:
    """The app. `on_webhooks_committed(n)` is called after each inbox commit that added `n`
    pending webhook events (on the intake writer's thread); `on_outbox_committed()` after each
    request commit that added outbox rows (card links, pass updates)."""
    settings = settings or Settings()
    owns_engine = engine is None
    db = engine or make_engine(settings.database_url, pool_size=settings.db_pool_size)
    intake = IntakeWriter(
        db,
        max_rows=settings.webhook_batch_max_rows,
        max_wait=settings.webhook_batch_wait_ms / 1000,
        route_ttl=settings.webhook_route_cache_seconds,
        on_committed=on_webhooks_committed,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Everything loaded so far (modules, app, settings) lives as long as the process: keep
        # it out of the cyclic collector's generations, so a full collection under load walks
        # only per-request garbage (shorter pauses, a lower p99).
        gc.collect()
        gc.freeze()
        await intake.start()
        try:
            yield
        finally:
            # Queued deliveries are committed (and answered) before the engine goes away.
            await intake.stop()
        if read_db is not None:
            read_db.dispose()
        if owns_engine:
            db.dispose()

    app = LoyaltyApp(
        title="loyalty-sync",
        version="0.1.0",
        description=(
            "Stamp-card loyalty store (Leal-style REST API): customers with external references "
            "and metadata, customer cards, stamps and rewards."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    # Parsed once: the webhook route reads them on every delivery.
    app.state.shopify_secrets = settings.shopify_secrets()
    app.state.engine = db
    app.state.sessionmaker = make_sessionmaker(db)
    if on_outbox_committed is not None:
        on_outbox_commit(app.state.sessionmaker, on_outbox_committed)
    app.state.intake = intake
    # Reads (GET/HEAD) on PostgreSQL use a pool of autocommit connections: no BEGIN/ROLLBACK
    # round trips, and no isolation-level switch on each checkout. SQLite keeps one engine.
    read_db = (
        make_engine(db.url, pool_size=settings.db_pool_size, isolation_level="AUTOCOMMIT")
        if db.dialect.name == "postgresql"
        else None
    )
    app.state.read_sessionmaker = (
        make_sessionmaker(read_db) if read_db is not None else app.state.sessionmaker
    )
    errors.install(app)
    app.add_middleware(RequestContextMiddleware)
    app.include_router(customers.router)
    app.include_router(customer_cards.router)
    app.include_router(webhooks.router)

    @app.get("/healthz", tags=["ops"])
    def healthz(request: Request) -> JSONResponse:
        """Liveness + database check."""
        body: dict[str, Any] = {"status": "ok", "database": "ok"}
        try:
            with request.app.state.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - any failure means "not healthy"
            body = {"status": "error", "database": type(exc).__name__}
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    # Gauges from the database: two aggregate queries at most once per REFRESH_SECONDS, however
    # many scrapers there are; the last figures are served while the database is unreachable.
    refresh_db_gauges = metrics_db.refresher(app.state.read_sessionmaker)
    app.state.metrics_refresher = refresh_db_gauges

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        """Prometheus text format: webhook intake counters and the database gauges (no auth:
        counts and ids only, never customer data; keep the port internal)."""
        refresh_db_gauges()
        return Response(metrics.render_latest(), media_type=metrics.CONTENT_TYPE)

    return app
