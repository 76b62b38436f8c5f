"""`loyalty-sync`: the operator CLI (an edge: builds the settings, opens sessions, commits).

Results are one JSON document on stdout; human messages and logs go to stderr. A failing command
exits 1 (2 for usage errors) with a one-line message, never a traceback. Each command is one
transaction.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from sqlalchemy import Engine, select
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session

from models.db import make_engine, make_sessionmaker, normalise_url
from models.errors import NotFound, StoreError
from worker.settings import Settings

# --- plumbing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CliState:
    settings: Settings


def _one_line(text: str) -> str:
    return " ".join(text.split())


def fail(message: str, *, code: int = 1) -> NoReturn:
    typer.echo(f"error: {_one_line(message)}", err=True)
    raise typer.Exit(code)


def _safe_url(url: str) -> str:
    try:
        return normalise_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable DATABASE_URL>"


def _database_message(exc: SQLAlchemyError, url: str) -> str:
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    detail = lines[0] if lines else type(exc).__name__
    message = f"database error: {detail} ({_safe_url(url)})"
    if "no such table" in detail or ('relation "' in detail and "does not exist" in detail):
        message += "; is the database migrated? run `loyalty-sync db upgrade`"
    return message


def _settings(ctx: typer.Context) -> Settings:
    state = ctx.find_object(CliState)
    assert state is not None, "the root callback sets the state"
    return state.settings


def emit(result: Any) -> None:
    """The command's result: one JSON document on stdout."""
    typer.echo(json.dumps(result))


def say(message: str) -> None:
    """A message for the human at the terminal (stderr, so stdout stays parseable)."""
    typer.echo(message, err=True)


@contextmanager
def database(ctx: typer.Context) -> Iterator[Engine]:
    """An engine for one command; the errors a command meets on purpose become exit 1."""
    settings = _settings(ctx)
    try:
        engine = make_engine(settings.database_url, pool_size=1)
        try:
            yield engine
        finally:
            engine.dispose()
    except StoreError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(_database_message(exc, settings.database_url))


@contextmanager
def transaction(ctx: typer.Context) -> Iterator[Session]:
    """One command = one session = one transaction, committed when the block succeeds."""
    with database(ctx) as engine, make_sessionmaker(engine)() as session:
        yield session
        session.commit()


# --- the application --------------------------------------------------------------------------

app = typer.Typer(
    help="loyalty-sync: stamp-card loyalty store, its REST API and (later) the sync worker.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
store_app = typer.Typer(help="Stores (API accounts).", no_args_is_help=True)
token_app = typer.Typer(help="API tokens of a store.", no_args_is_help=True)
card_app = typer.Typer(help="Card templates.", no_args_is_help=True)
reward_app = typer.Typer(help="Rewards of a card.", no_args_is_help=True)
connect_app = typer.Typer(
    help="Connect a store to a source (credentials are encrypted with SECRET_KEY).",
    no_args_is_help=True,
)
connections_app = typer.Typer(help="A store's connections to sources.", no_args_is_help=True)
sync_app = typer.Typer(help="Sync customers from a source into the store.", no_args_is_help=True)
conflicts_app = typer.Typer(
    help="Records a sync could not write (ambiguous identity).", no_args_is_help=True
)
events_app = typer.Typer(help="The webhook inbox: received deliveries.", no_args_is_help=True)
resync_app = typer.Typer(help="Re-read single records from a source now.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(store_app, name="store")
app.add_typer(token_app, name="token")
app.add_typer(card_app, name="card")
app.add_typer(reward_app, name="reward")
app.add_typer(connect_app, name="connect")
app.add_typer(connections_app, name="connections")
app.add_typer(sync_app, name="sync")
app.add_typer(conflicts_app, name="conflicts")
app.add_typer(events_app, name="events")
app.add_typer(resync_app, name="resync")


@app.callback()
def _root(ctx: typer.Context) -> None:
    """Configuration comes from the environment (and `.env`): DATABASE_URL, LOG_FORMAT, ..."""
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        fail(f"invalid configuration: {problems}")
    from worker.logging import configure_logging

    configure_logging(log_format=settings.log_format, level=settings.log_level)
    from worker.metrics import install_upstream_observer

    install_upstream_observer()
    ctx.obj = CliState(settings=settings)


# --- db ---------------------------------------------------------------------------------------


def migrate(engine: Engine) -> str:
    """Upgrade to the newest revision; returns the revision the database is at."""
    # Alembic announces each of its plugins at INFO when imported: noise in an operator's terminal.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from alembic.runtime.migration import MigrationContext

    from models.migrate import upgrade

    upgrade(engine)
    with engine.connect() as conn:
        revision = MigrationContext.configure(conn).get_current_revision()
    assert revision is not None
    return revision


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or upgrade the schema (creates ./var/ for the default SQLite database)."""
    settings = _settings(ctx)
    with database(ctx) as engine:
        revision = migrate(engine)
    say(f"Database {_safe_url(settings.database_url)} is at revision {revision}.")
    emit({"status": "ok", "revision": revision})


# --- serving ------------------------------------------------------------------------------------

HostOption = Annotated[
    str | None, typer.Option("--host", help="Interface to bind [default: API_HOST or 127.0.0.1]")
]
PortOption = Annotated[
    int | None,
    typer.Option("--port", min=1, max=65535, help="Port [default: API_PORT or 8000]"),
]


def serve_api(settings: Settings, *, host: str, port: int) -> None:
    """Serve the REST API in the foreground until SIGINT/SIGTERM; each inbox commit wakes the
    workers (one drain message per burst of commits, see `worker.tasks.DrainWaker`)."""
    import uvicorn

    from api.app import create_app
    from worker.celery_app import broker_url, configure, ensure_broker_directory
    from worker.scheduled import send_outbox
    from worker.tasks import DrainWaker

    configure(settings)
    ensure_broker_directory(broker_url(settings))
    waker = DrainWaker().start()
    # Card links and pass updates go out right after the commit that queued them (one
    # message per burst), not at the outbox's next periodic pass.
    outbox_waker = DrainWaker(send_outbox, interval=0.2).start()
    try:
        # uvicorn shuts down gracefully on Ctrl+C, then re-raises the signal: that is no error.
        with suppress(KeyboardInterrupt):
            # log_config=None keeps uvicorn on the root logger that configure_logging set up.
            uvicorn.run(
                create_app(
                    settings,
                    on_webhooks_committed=waker,
                    on_outbox_committed=lambda: outbox_waker(1),
                ),
                host=host,
                port=port,
                log_config=None,
                # Our middleware logs every request (with its request id); uvicorn's access
                # log would be a second, unstructured line per request.
                access_log=False,
                server_header=False,
            )
    finally:
        waker.stop()
        outbox_waker.stop()


@dataclass(frozen=True, slots=True)
class Service:
    """Something `up` runs until it is stopped."""

    name: str
    run: Callable[[], None]


def run_services(services: Sequence[Service]) -> None:
    """Run the last service in the foreground (uvicorn wants the main thread for its signal
    handlers) and the others in daemon threads that end with it."""
    *background, foreground = services
    for service in background:
        threading.Thread(target=service.run, name=service.name, daemon=True).start()
    foreground.run()


@app.command("api")
def api_command(ctx: typer.Context, host: HostOption = None, port: PortOption = None) -> None:
    """Serve the REST API (run `loyalty-sync db upgrade` first)."""
    settings = _settings(ctx)
    serve_api(settings, host=host or settings.api_host, port=port or settings.api_port)


ConcurrencyOption = Annotated[
    int, typer.Option("--concurrency", min=1, max=64, help="Worker processes draining the inbox")
]
PARENT_PID_VARIABLE = "LOYALTY_SYNC_PARENT_PID"
WORKER_STOP_SECONDS = 20.0


def run_worker(
    settings: Settings,
    *,
    concurrency: int,
    sweep_interval: float,
    queues: Sequence[str] | None = None,
) -> int:
    """A Celery worker in the foreground (prefork pool of `concurrency` processes) until
    SIGINT/SIGTERM (warm shutdown: running tasks finish); returns its exit code. It consumes
    `queues` (default: every queue of the service)."""
    from celery.signals import worker_ready, worker_shutting_down

    from worker import metrics
    from worker.metrics_db import DbGaugeCollector

    # Before the pool forks and before any metric is touched: children write their samples to
    # files the exporter (in this process) sums at scrape time.
    if settings.metrics_port:
        metrics.prepare_multiprocess()
    exporters: list[metrics.Exporter] = []

    from worker import tasks
    from worker.celery_app import QUEUE, QUEUES, broker_url, configure, ensure_broker_directory

    celery = configure(settings)
    ensure_broker_directory(broker_url(settings))
    tasks.database.use(settings.database_url)
    parent = os.environ.get(PARENT_PID_VARIABLE, "")
    periodic = tasks.PeriodicSweep(
        interval=sweep_interval, parent_pid=int(parent) if parent.isdigit() else None
    )

    # The thread starts once the pool has forked its children (never before a fork).
    def _ready(**_kwargs: Any) -> None:
        periodic.start()
        exporter = metrics.start_exporter(
            settings.metrics_port,
            collectors=[DbGaugeCollector.for_url(settings.database_url)],
        )
        if exporter is not None:
            exporters.append(exporter)

    def _stopping(**_kwargs: Any) -> None:
        periodic.stop()

    worker_ready.connect(_ready, weak=False)
    worker_shutting_down.connect(_stopping, weak=False)
    try:
        worker = celery.Worker(
            hostname=f"loyalty-sync-{os.getpid()}@{socket.gethostname()}",
            concurrency=concurrency,
            queues=",".join(queues or (*QUEUES, QUEUE)),
            pool="prefork",
            loglevel=settings.log_level.upper(),
            quiet=True,  # no banner on stdout
            without_gossip=True,
            without_mingle=True,
            without_heartbeat=True,
        )
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        periodic.stop()
        for exporter in exporters:
            exporter.stop()
        worker_ready.disconnect(_ready)
        worker_shutting_down.disconnect(_stopping)


@app.command("worker")
def worker_command(
    ctx: typer.Context,
    concurrency: ConcurrencyOption = 2,
    sweep_interval: Annotated[
        float,
        typer.Option(
            "--sweep-interval", min=0.1, hidden=True, help="Seconds between periodic sweeps"
        ),
    ] = 30.0,
    queues: Annotated[
        str | None,
        typer.Option(
            "--queues",
            "-Q",
            help="Comma-separated queues to consume (webhooks, syncs, outbox) [default: all]",
        ),
    ] = None,
) -> None:
    """Run a worker: webhook inbox (woken by the API, swept every 30 s), syncs, stamp
    reconciliation and outbox delivery, as beat schedules them."""
    settings = _settings(ctx)
    from worker.celery_app import QUEUE, QUEUES, broker_url

    chosen = [q.strip() for q in (queues or "").split(",") if q.strip()] or None
    if chosen is not None:
        unknown = sorted(set(chosen) - {*QUEUES, QUEUE})
        if unknown:
            fail(f"unknown queue(s) {', '.join(unknown)}; known: {', '.join(QUEUES)}", code=2)
    say(
        f"Worker: {concurrency} process(es), queues {','.join(chosen or QUEUES)}, broker "
        f"{_safe_broker(broker_url(settings))}, database {_safe_url(settings.database_url)}. "
        "Ctrl+C stops."
    )
    code = run_worker(
        settings, concurrency=concurrency, sweep_interval=sweep_interval, queues=chosen
    )
    if code:
        fail(f"the worker stopped with exit code {code}")


def _safe_broker(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable CELERY_BROKER_URL>"


def run_beat(settings: Settings) -> int:
    """Celery beat in the foreground until SIGINT/SIGTERM: sends the periodic tasks of
    `worker.celery_app.beat_schedule`. Exactly one beat may run: it holds the cluster-wide
    `beat` lock (Redis / PostgreSQL advisory / file lock) for its lifetime; a second one exits
    with 1 at once."""
    from pathlib import Path

    from celery.beat import Service as BeatService

    from models.db import make_engine
    from worker.celery_app import (
        BEAT_SCHEDULE_FILE,
        broker_url,
        configure,
        ensure_broker_directory,
    )
    from worker.locks import exclusive_lock

    celery = configure(settings)
    ensure_broker_directory(broker_url(settings))
    Path(BEAT_SCHEDULE_FILE).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url, pool_size=1)
    parent = os.environ.get(PARENT_PID_VARIABLE, "")
    service = BeatService(app=celery, schedule_filename=BEAT_SCHEDULE_FILE, max_interval=5.0)
    stop = threading.Event()

    def _watch_parent() -> None:  # `up` went away: stop like on Ctrl+C
        while not stop.wait(1.0):
            if parent.isdigit() and os.getppid() != int(parent):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def _terminate(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with exclusive_lock("beat", redis_url=settings.redis_url, engine=engine, ttl=60) as held:
            if not held:
                say("Another beat is already running (only one may); exiting.")
                return 1
            threading.Thread(target=_watch_parent, name="beat-parent", daemon=True).start()
            service.start()  # returns on SystemExit/KeyboardInterrupt, after saving state
            return 0
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, previous)
        engine.dispose()


@app.command("beat")
def beat_command(ctx: typer.Context) -> None:
    """Run the scheduler (exactly one per deployment): customer syncs per connection, stamp
    reconciliation, outbox delivery, inbox sweeps and retention, as Celery tasks."""
    settings = _settings(ctx)
    from worker.celery_app import broker_url

    say(
        f"Beat: broker {_safe_broker(broker_url(settings))}, "
        f"database {_safe_url(settings.database_url)}. Ctrl+C stops."
    )
    code = run_beat(settings)
    if code:
        raise typer.Exit(code)


class ChildProcess:
    """A `loyalty-sync` command as a child of `up`: started before the API, stopped after it
    (SIGTERM, then SIGKILL if it does not finish in time). It stops itself if `up` dies."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, PARENT_PID_VARIABLE: str(os.getpid())}
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "worker.cli", *self.args],
            env=env,
            stdout=subprocess.DEVNULL,  # `up` prints nothing on stdout; logs go to stderr
        )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@app.command("up")
def up(
    ctx: typer.Context,
    host: HostOption = None,
    port: PortOption = None,
    concurrency: ConcurrencyOption = 1,
) -> None:
    """Everything on one machine: migrate the database, then run the worker and beat and serve
    the API."""
    from models.tables import Store

    settings = _settings(ctx)
    host = host or settings.api_host
    port = port or settings.api_port
    with database(ctx) as engine:
        revision = migrate(engine)
        with engine.connect() as conn:
            has_store = conn.scalar(select(Store.id).limit(1)) is not None
    say(f"Database {_safe_url(settings.database_url)} is at revision {revision}.")
    if not has_store:
        say(
            'No store yet: create one with `loyalty-sync store create --name "My shop"` '
            "(it prints the store's API token)."
        )
    say(
        f"Serving the API on http://{host}:{port} (docs at /docs), with a worker and beat. "
        "Ctrl+C stops."
    )
    # Worker and beat run as child processes (Celery and uvicorn each want a main thread and
    # their own signal handlers).
    children = [ChildProcess("worker", "--concurrency", str(concurrency)), ChildProcess("beat")]
    for child in children:
        child.start()
    try:
        services = [Service("api", lambda: serve_api(settings, host=host, port=port))]
        run_services(services)
    finally:
        for child in reversed(children):
            child.stop()


# --- stores and tokens --------------------------------------------------------------------------


@store_app.command("create")
def store_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="Store name")],
    country: Annotated[
        str, typer.Option("--country", help="ISO 3166 region for reading national phone numbers")
    ] = "US",
) -> None:
    """Create a store and its first API token (shown once)."""
    from models.accounts import create_store

    with transaction(ctx) as session:
        store, token = create_store(session, name=name, country=country)
        result = {"id": store.id, "name": store.name, "country": store.country, "api_token": token}
    say(f"Store {store.id} created. Keep the API token: it is not shown again.")
    emit(result)


@store_app.command("list")
def store_list(ctx: typer.Context) -> None:
    """List the stores."""
    from models.tables import Store

    with transaction(ctx) as session:
        stores = session.scalars(select(Store).order_by(Store.id)).all()
        result = [{"id": s.id, "name": s.name, "country": s.country} for s in stores]
    emit(result)


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    store: Annotated[int, typer.Option("--store", help="Store id")],
    name: Annotated[str | None, typer.Option("--name", help="What the token is for")] = None,
) -> None:
    """Create another API token for a store (shown once)."""
    from models.accounts import create_token

    with transaction(ctx) as session:
        row, token = create_token(session, store_id=store, name=name)
        result = {"id": row.id, "store_id": row.store_id, "name": row.name, "api_token": token}
    say(f"Token {row.id} created for store {store}. Keep it: it is not shown again.")
    emit(result)


@token_app.command("revoke")
def token_revoke(
    ctx: typer.Context,
    token: Annotated[str | None, typer.Option("--token", help="The token itself")] = None,
    token_id: Annotated[int | None, typer.Option("--id", help="The token's id")] = None,
) -> None:
    """Revoke a token, given either the token or its id (revoking twice is harmless)."""
    from models.accounts import revoke_token

    if (token is None) == (token_id is None):
        fail("give exactly one of --token or --id", code=2)
    with transaction(ctx) as session:
        row = revoke_token(session, token=token, token_id=token_id)
        result = {"id": row.id, "revoked": True}
    emit(result)


# --- cards and rewards --------------------------------------------------------------------------


class CardScope(StrEnum):
    active = "active"
    archived = "archived"
    all = "all"


@card_app.command("create")
def card_create(
    ctx: typer.Context,
    store: Annotated[int, typer.Option("--store", help="Store id")],
    name: Annotated[str, typer.Option("--name", help="Card name")],
    stamps_required: Annotated[
        int, typer.Option("--stamps-required", help="Stamps to complete the card (1-18)")
    ],
    initial_stamps: Annotated[
        int, typer.Option("--initial-stamps", help="Welcome stamps on enrolment (< required)")
    ] = 0,
) -> None:
    """Create a card template."""
    from api.schemas import render_card
    from models.cards import create_card

    with transaction(ctx) as session:
        card = create_card(
            session,
            store_id=store,
            name=name,
            stamps_required=stamps_required,
            initial_stamps=initial_stamps,
        )
        result = render_card(card, [])
    emit(result)


@card_app.command("archive")
def card_archive(
    ctx: typer.Context, card_id: Annotated[int, typer.Argument(metavar="ID", help="Card id")]
) -> None:
    """Archive a card: hidden from `GET /cards` by default, no new enrolments."""
    from models.cards import archive_card

    with transaction(ctx) as session:
        card = archive_card(session, card_id=card_id)
        result = {"id": card.id, "archived": True}
    emit(result)


@card_app.command("list")
def card_list(
    ctx: typer.Context,
    store: Annotated[int, typer.Option("--store", help="Store id")],
    scope: Annotated[CardScope, typer.Option("--scope", help="Which cards")] = CardScope.active,
) -> None:
    """List a store's cards with their rewards (the shape of `GET /cards`)."""
    from api.schemas import render_card
    from models.cards import list_cards
    from models.tables import Reward, Store

    with transaction(ctx) as session:
        if session.get(Store, store) is None:
            raise NotFound("Store")
        cards = list_cards(session, store_id=store, scope=scope.value)
        rewards = session.scalars(
            select(Reward).where(Reward.card_id.in_([c.id for c in cards])).order_by(Reward.id)
        ).all()
        result = [render_card(c, [r for r in rewards if r.card_id == c.id]) for c in cards]
    emit(result)


@reward_app.command("create")
def reward_create(
    ctx: typer.Context,
    card: Annotated[int, typer.Option("--card", help="Card id")],
    name: Annotated[str, typer.Option("--name", help="Reward name")],
    stamps: Annotated[int, typer.Option("--stamps", help="Cost in stamps (1..stamps_required)")],
    inactive: Annotated[
        bool, typer.Option("--inactive", help="Create it switched off (not redeemable)")
    ] = False,
) -> None:
    """Create a reward on a card."""
    from api.schemas import render_reward
    from models.cards import create_reward

    with transaction(ctx) as session:
        reward = create_reward(session, card_id=card, name=name, stamps=stamps, active=not inactive)
        result = {**render_reward(reward), "card_id": reward.card_id}
    emit(result)


# --- connections --------------------------------------------------------------------------------


def _secret_key(ctx: typer.Context) -> bytes:
    from worker.secret_key import SecretKeyError, resolve_secret_key

    try:
        return resolve_secret_key(_settings(ctx))
    except (SecretKeyError, OSError) as exc:
        fail(f"secret key: {exc}")


def _connect(
    ctx: typer.Context,
    *,
    store: int,
    source: str,
    account: str,
    access_token: str | None = None,
    secrets: dict[str, str] | None = None,
    api_base_url: str | None,
    api_version: str | None,
    config: dict[str, Any] | None = None,
) -> None:
    from models.connections import connect

    key = _secret_key(ctx)
    with transaction(ctx) as session:
        if config and "card_id" in config:
            _check_card(session, store=store, card_id=config["card_id"])
        row, created = connect(
            session,
            store_id=store,
            source=source,
            account=account,
            access_token=access_token,
            secrets=secrets,
            api_base_url=api_base_url,
            api_version=api_version,
            key=key,
            config=config,
        )
        result = {
            "id": row.id,
            "source": row.source,
            "account": row.account,
            "api_base_url": row.api_base_url,
            "status": row.status,
            "created": created,
        }
        if config:
            result["config"] = {k: row.config.get(k) for k in config}
    emit(result)


def _check_card(session: Session, *, store: int, card_id: int) -> None:
    """The card an import earns on must be one of the store's live cards."""
    from models.tables import CardTemplate, is_valid_id

    card = session.get(CardTemplate, card_id) if is_valid_id(card_id) else None
    if card is None or card.store_id != store:
        raise NotFound("Card")
    if card.archived_at is not None:
        fail(f"card {card_id} is archived")


StoreOption = Annotated[int, typer.Option("--store", help="Store id")]
TokenOption = Annotated[
    str, typer.Option("--access-token", help="API access token (stored encrypted)")
]


@connect_app.command("shopify")
def connect_shopify(
    ctx: typer.Context,
    store: StoreOption,
    shop_domain: Annotated[
        str, typer.Option("--shop-domain", help="The shop's domain, e.g. my-shop.myshopify.com")
    ],
    access_token: TokenOption,
    api_base_url: Annotated[
        str | None,
        typer.Option("--api-base-url", help="API base URL [default: https://{shop-domain}]"),
    ] = None,
    api_version: Annotated[
        str | None,
        typer.Option("--api-version", help="Admin API version [default: SHOPIFY_API_VERSION]"),
    ] = None,
) -> None:
    """Connect a Shopify shop (connecting it again replaces the token)."""
    _connect(
        ctx,
        store=store,
        source="shopify",
        account=shop_domain,
        access_token=access_token,
        api_base_url=api_base_url,
        api_version=api_version or _settings(ctx).shopify_api_version,
    )


@connect_app.command("square")
def connect_square(
    ctx: typer.Context,
    store: StoreOption,
    merchant_id: Annotated[str, typer.Option("--merchant-id", help="Square merchant id")],
    access_token: TokenOption,
    api_base_url: Annotated[
        str | None,
        typer.Option("--api-base-url", help="API base URL [default: https://connect.squareup.com]"),
    ] = None,
) -> None:
    """Connect a Square merchant (connecting it again replaces the token)."""
    _connect(
        ctx,
        store=store,
        source="square",
        account=merchant_id,
        access_token=access_token,
        api_base_url=api_base_url,
        api_version=None,
    )


@connect_app.command("appystamp")
def connect_appystamp(
    ctx: typer.Context,
    store: StoreOption,
    api_key: Annotated[str, typer.Option("--api-key", help="Appy Stamp API key")],
    api_secret: Annotated[
        str, typer.Option("--api-secret", help="Appy Stamp API secret (stored encrypted)")
    ],
    api_base_url: Annotated[
        str | None,
        typer.Option(
            "--api-base-url",
            help="API base URL [default: https://stamp.appydesign.io/rest_api/v1]",
        ),
    ] = None,
    card: Annotated[
        int | None,
        typer.Option("--card", help="The store's card that imported stamp balances go to"),
    ] = None,
) -> None:
    """Connect the store's Appy Stamp account (one per store; connecting again replaces the
    keys)."""
    _connect(
        ctx,
        store=store,
        source="appystamp",
        account="",
        secrets={"api_key": api_key, "api_secret": api_secret},
        api_base_url=api_base_url,
        api_version=None,
        config={"card_id": card} if card is not None else None,
    )


@connect_app.command("loke")
def connect_loke(
    ctx: typer.Context,
    store: StoreOption,
    organization_id: Annotated[str, typer.Option("--organization-id", help="LOKE organization id")],
    client_id: Annotated[str, typer.Option("--client-id", help="OAuth2 client id")],
    client_secret: Annotated[
        str, typer.Option("--client-secret", help="OAuth2 client secret (stored encrypted)")
    ],
    api_base_url: Annotated[
        str | None,
        typer.Option("--api-base-url", help="API base URL [default: https://api.loke.global]"),
    ] = None,
    auth_url: Annotated[
        str | None,
        typer.Option(
            "--auth-url",
            help="OAuth2 issuer; tokens from {auth-url}/token [default: https://auth.loke.global]",
        ),
    ] = None,
    card: Annotated[
        int | None,
        typer.Option("--card", help="The store's card LOKE points become stamps on"),
    ] = None,
    points_per_stamp: Annotated[
        int | None,
        typer.Option(
            "--points-per-stamp",
            min=1,
            help="Mirror pointsBalance as floor(points / this) stamps on --card",
        ),
    ] = None,
) -> None:
    """Connect a LOKE organization (OAuth2 client credentials; connecting again replaces
    them)."""
    from models.connections import LOKE_AUTH_URL

    if (card is None) != (points_per_stamp is None):
        fail("--card and --points-per-stamp go together", code=2)
    config: dict[str, Any] = {"auth_url": auth_url or LOKE_AUTH_URL}
    if card is not None:
        config.update(card_id=card, points_per_stamp=points_per_stamp)
    _connect(
        ctx,
        store=store,
        source="loke",
        account=organization_id,
        secrets={"client_id": client_id, "client_secret": client_secret},
        api_base_url=api_base_url,
        api_version=None,
        config=config,
    )


@connections_app.command("list")
def connections_list(
    ctx: typer.Context,
    store: Annotated[int | None, typer.Option("--store", help="Only this store's")] = None,
) -> None:
    """List connections (never their credentials)."""
    from models.connections import list_connections, render_connection

    with transaction(ctx) as session:
        result = [render_connection(c) for c in list_connections(session, store_id=store)]
    emit(result)


# --- sync runs and conflicts -------------------------------------------------------------------


class SyncSource(StrEnum):
    shopify = "shopify"
    square = "square"
    appystamp = "appystamp"
    loke = "loke"


def _human_summary(summary: dict[str, Any]) -> str:
    text = (
        f"Sync {summary['status']}{' (dry run)' if summary['dry_run'] else ''}: "
        f"{summary['pages']} pages, {summary['requests']} requests, {summary['seen']} seen, "
        f"{summary['created']} created, {summary['updated']} updated, "
        f"{summary['linked']} linked, {summary['unchanged']} unchanged, "
        f"{summary['skipped']} skipped, {summary['conflicts']} conflicts"
    )
    if summary["resumed"]:
        text += " (resumed)"
    return text


@sync_app.command("run")
def sync_run(
    ctx: typer.Context,
    store: StoreOption,
    source: Annotated[SyncSource, typer.Option("--source", help="Which source to pull from")],
    full: Annotated[
        bool, typer.Option("--full", help="Every record, not only those changed since last run")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would change; write nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The summary as JSON on stdout")] = False,
    connection: Annotated[
        int | None,
        typer.Option("--connection", help="Connection id (when the store has several)"),
    ] = None,
    enqueue: Annotated[
        bool,
        typer.Option("--enqueue", help="Hand the run to the workers instead of running it here"),
    ] = False,
) -> None:
    """Pull the source's customers into the store, page by page (resumes an interrupted run).

    Exits 0 when the run succeeded, 1 otherwise (the summary is printed either way). With
    `--enqueue` the workers run it (in page-sized steps) and the task id is printed.
    """
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from models.sync_state import pick_connection
    from worker.sync import SyncSummary, run_customer_sync

    settings = _settings(ctx)
    if enqueue and dry_run:
        fail("--enqueue and --dry-run don't go together (a dry run reports here)", code=2)
    key = _secret_key(ctx)
    console = Console(stderr=True)
    with database(ctx) as engine:
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            connection_id = pick_connection(
                session, store_id=store, source=source.value, connection_id=connection
            ).id
        if enqueue:
            task_id = _send_task(settings, "sync", connection_id=connection_id, full=full)
            emit({"enqueued": True, "task_id": task_id, "connection_id": connection_id})
            return
        with Progress(
            SpinnerColumn(),
            TextColumn(f"{source.value} sync"),
            TextColumn("{task.fields[pages]} pages, {task.fields[records]} records"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        ) as progress:
            task = progress.add_task("sync", total=None, pages=0, records=0)

            def on_page(summary: SyncSummary) -> None:
                progress.update(task, pages=summary.pages, records=summary.seen)

            summary = run_customer_sync(
                sessions,
                connection_id=connection_id,
                full=full,
                dry_run=dry_run,
                settings=settings,
                key=key,
                on_page=on_page,
            )
    result = summary.as_dict()
    if as_json:
        emit(result)
    else:
        typer.echo(_human_summary(result))
    if not summary.succeeded:
        fail(f"sync {summary.status}: {summary.error or 'unknown error'}")


def _send_task(settings: Settings, what: str, **kwargs: Any) -> str:
    """Enqueue an operator's task on the broker; a clear error when the broker is down."""
    from worker.celery_app import broker_url, configure, ensure_broker_directory

    configure(settings)
    ensure_broker_directory(broker_url(settings))
    from worker import scheduled

    try:
        if what == "sync":
            return scheduled.send_sync(kwargs["connection_id"], full=kwargs["full"])
        result = scheduled.resync_customer_task.apply_async(
            kwargs=kwargs, retry=True, retry_policy={"max_retries": 2, "interval_start": 0}
        )
        return str(result.id)
    except Exception as exc:  # noqa: BLE001 - any broker failure: tell the operator
        fail(
            f"could not reach the broker {_safe_broker(broker_url(settings))} "
            f"({type(exc).__name__}); run without --enqueue to do it here"
        )


def _lag(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@sync_app.command("status")
def sync_status_command(
    ctx: typer.Context,
    store: Annotated[int | None, typer.Option("--store", help="Only this store's")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list on stdout")] = False,
) -> None:
    """Per connection and stream: last run, lag since the watermark, counts, errors and the
    webhook miss rate (orders found only by reconciliation)."""
    from models.schedule import sync_status

    with transaction(ctx) as session:
        result = sync_status(session, store_id=store)
        _add_miss_rates(session, result)
    if as_json:
        emit(result)
        return
    if not result:
        typer.echo("No connections.")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Sync status")
    columns = ("conn", "store", "source", "account", "stream", "state", "lag", "last run")
    for column in (*columns, "seen", "created", "updated", "conflicts", "miss rate", "error"):
        table.add_column(column)
    for row in result:
        run = row["last_run"] or {}
        state = row["connection_status"] if row["enabled"] else "disabled"
        if row["in_progress"]:
            state += " (running)"
        miss = row.get("webhook_miss_rate")
        table.add_row(
            str(row["connection_id"]),
            str(row["store_id"]),
            row["source"],
            row["account"],
            row["stream"],
            state,
            _lag(row["lag_seconds"]),
            f"{run.get('status', '-')} {run.get('finished_at') or run.get('started_at') or ''}",
            str(run.get("seen", "")),
            str(run.get("created", "")),
            str(run.get("updated", "")),
            str(run.get("conflicts", "")),
            "" if miss is None else f"{miss:.1%}",
            (run.get("error") or row["connection_error"] or "")[:80],
        )
    Console(width=220).print(table)


def _add_miss_rates(session: Session, rows: list[dict[str, Any]]) -> None:
    """`webhook_miss_rate` per connection, when the stamps area reports one."""
    import importlib

    rates: dict[int, float | None] = {}
    try:
        compute = getattr(importlib.import_module("models.earning"), "webhook_miss_rates", None)
    except ImportError:
        compute = None
    if compute is not None:
        rates = compute(session, [r["connection_id"] for r in rows])
    for row in rows:
        row["webhook_miss_rate"] = rates.get(row["connection_id"])


@resync_app.command("customer")
def resync_customer_command(
    ctx: typer.Context,
    store: StoreOption,
    source: Annotated[SyncSource, typer.Option("--source", help="Which source to read")],
    external_id: Annotated[
        str, typer.Option("--external-id", help="The customer's id in the source")
    ],
    connection: Annotated[
        int | None,
        typer.Option("--connection", help="Connection id (when the store has several)"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would change; write nothing")
    ] = False,
    enqueue: Annotated[
        bool, typer.Option("--enqueue", help="Hand it to the workers instead of running it here")
    ] = False,
) -> None:
    """Fetch one customer from the source now and apply it (a customer the source no longer
    has becomes a tombstone). Prints what it did as JSON."""
    from connectors.errors import ConnectorError
    from models.sync_state import pick_connection
    from worker.sync import resync_customer

    settings = _settings(ctx)
    if enqueue and dry_run:
        fail("--enqueue and --dry-run don't go together (a dry run reports here)", code=2)
    key = _secret_key(ctx)
    with database(ctx) as engine:
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            connection_id = pick_connection(
                session, store_id=store, source=source.value, connection_id=connection
            ).id
        if enqueue:
            task_id = _send_task(
                settings, "resync", connection_id=connection_id, external_id=external_id
            )
            emit({"enqueued": True, "task_id": task_id, "connection_id": connection_id})
            return
        try:
            result = resync_customer(
                sessions,
                connection_id=connection_id,
                external_id=external_id,
                settings=settings,
                key=key,
                dry_run=dry_run,
            )
        except ConnectorError as exc:
            fail(f"{source.value}: {type(exc).__name__}: {exc}")
    emit(result)


@conflicts_app.command("list")
def conflicts_list(
    ctx: typer.Context,
    store: Annotated[int | None, typer.Option("--store", help="Only this store's")] = None,
    include_resolved: Annotated[bool, typer.Option("--all", help="Resolved conflicts too")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list on stdout")] = False,
) -> None:
    """List sync conflicts: records not written because their identity is ambiguous."""
    from models.sync_state import list_conflicts, render_conflict

    with transaction(ctx) as session:
        rows = list_conflicts(session, store_id=store, include_resolved=include_resolved)
        result = [render_conflict(c) for c in rows]
    if as_json:
        emit(result)
        return
    if not result:
        typer.echo("No conflicts.")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Sync conflicts")
    for column in ("id", "store", "source", "external id", "kind", "detail", "customers", "seen"):
        table.add_column(column)
    table.add_column("last seen")
    if include_resolved:
        table.add_column("resolved")
    for c in result:
        cells = [
            str(c["id"]),
            str(c["store_id"]),
            c["source"],
            c["external_id"],
            c["kind"],
            c["detail"],
            ", ".join(str(i) for i in c["customer_ids"]),
            str(c["occurrences"]),
            c["last_seen_at"] or "",
        ]
        if include_resolved:
            cells.append(c["resolved_at"] or "")
        table.add_row(*cells)
    Console(width=200).print(table)


# --- webhook events (the inbox) ---------------------------------------------------------------


class EventStatus(StrEnum):
    pending = "pending"
    processing = "processing"
    done = "done"
    failed = "failed"
    ignored = "ignored"
    invalid = "invalid"


@events_app.command("list")
def events_list(
    ctx: typer.Context,
    status: Annotated[EventStatus | None, typer.Option("--status", help="Only this status")] = None,
    store: Annotated[int | None, typer.Option("--store", help="Only this store's")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list on stdout")] = False,
) -> None:
    """List received webhook deliveries, newest first (without their bodies)."""
    from models.webhook_processing import list_events, render_event

    with transaction(ctx) as session:
        rows = list_events(
            session, status=status.value if status else None, store_id=store, limit=limit
        )
        result = [render_event(e) for e in rows]
    if as_json:
        emit(result)
        return
    if not result:
        typer.echo("No webhook events.")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Webhook events")
    columns = ("id", "source", "topic", "store", "account", "status", "attempts", "received")
    for column in (*columns, "error"):
        table.add_column(column)
    for e in result:
        table.add_row(
            str(e["id"]),
            e["source"],
            e["topic"] or "",
            "" if e["store_id"] is None else str(e["store_id"]),
            e["account"] or "",
            e["status"],
            str(e["attempts"]),
            e["received_at"] or "",
            e["last_error"] or "",
        )
    Console(width=200).print(table)


@events_app.command("show")
def events_show(
    ctx: typer.Context, event_id: Annotated[int, typer.Argument(metavar="ID", help="Event id")]
) -> None:
    """One webhook delivery with its body and headers."""
    from models.tables import WebhookEvent
    from models.webhook_processing import render_event

    with transaction(ctx) as session:
        event = session.get(WebhookEvent, event_id)
        if event is None:
            fail(f"webhook event {event_id} not found")
        result = render_event(event, with_body=True)
    emit(result)


@events_app.command("replay")
def events_replay(
    ctx: typer.Context,
    event_id: Annotated[
        int | None, typer.Argument(metavar="[ID]", help="Replay this event")
    ] = None,
    status: Annotated[
        EventStatus | None,
        typer.Option("--status", help="Replay every event of this status (e.g. failed)"),
    ] = None,
) -> None:
    """Put deliveries back to pending (attempts reset) and wake the workers: one event by id,
    or all of a status."""
    from models.tables import WebhookEvent
    from models.webhook_processing import replay

    if (event_id is None) == (status is None):
        fail("give exactly one of ID or --status", code=2)
    if status in (EventStatus.pending, EventStatus.processing):
        fail(f"can't replay rows with status {status.value!r}", code=2)
    with transaction(ctx) as session:
        if event_id is not None and session.get(WebhookEvent, event_id) is None:
            fail(f"webhook event {event_id} not found")
        count = replay(session, event_id=event_id, status=status.value if status else None)
    if count:
        _wake_workers(_settings(ctx))
    emit({"replayed": count})


def _wake_workers(settings: Settings) -> None:
    """Best effort: the worker's periodic sweep drains the rows anyway."""
    from worker.celery_app import broker_url, configure, ensure_broker_directory
    from worker.tasks import send_drain

    configure(settings)
    ensure_broker_directory(broker_url(settings))
    try:
        send_drain()
    except Exception as exc:  # noqa: BLE001 - the rows are committed as pending
        say(f"Could not wake the workers ({type(exc).__name__}); the periodic sweep will.")


# Commands of other areas register themselves on the groups above (imported for that effect).
from worker import cli_outbox, cli_stamps  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    app(prog_name="loyalty-sync")


if __name__ == "__main__":
    main()
