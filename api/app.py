"""FastAPI application factory (an edge: reads settings, builds the engine)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text

from api import errors
from api.intake import IntakeWriter
from api.middleware import RequestContextMiddleware
from api.routes import customer_cards, customers, webhooks
from models.db import make_engine, make_sessionmaker
from worker.settings import Settings


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    on_webhooks_committed: Callable[[int], None] | None = None,
) -> FastAPI:
    """The app. `on_webhooks_committed(n)` is called after each inbox commit that added `n`
    pending webhook events (on the intake writer's thread)."""
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

    app = FastAPI(
        title="loyalty-sync",
        version="0.1.0",
        description=(
            "Stamp-card loyalty store (Leal-style REST API): customers with external references "
            "and metadata, customer cards, stamps and rewards."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = db
    app.state.sessionmaker = make_sessionmaker(db)
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

    return app
