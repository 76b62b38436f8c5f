"""The Celery app `loyalty_sync` (an edge: reads the settings).

Broker: `CELERY_BROKER_URL` (Redis in production) or, unset, the embedded default: kombu's
SQLAlchemy transport on a SQLite file under `./var/` (no server). No result backend: tasks log
their results, nobody waits for them. Tasks are registered explicitly (`include`), never by
autodiscovery; their names are dotted (`loyalty_sync.webhooks.drain`, …).

The database is the source of truth, not the broker: a drain message only says "look at the
inbox now". A lost message (broker down, worker killed) costs latency, never data: the worker's
periodic sweep re-drives whatever is left pending.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis
from sqlalchemy.engine import make_url

from worker.settings import Settings

APP_NAME = "loyalty_sync"
# Separate queues so a backfill never delays webhook processing: workers consume all three by
# default, and production scales them independently (`loyalty-sync worker --queues webhooks`).
WEBHOOKS_QUEUE = "webhooks"
SYNCS_QUEUE = "syncs"
OUTBOX_QUEUE = "outbox"
QUEUES = (WEBHOOKS_QUEUE, SYNCS_QUEUE, OUTBOX_QUEUE)
# Tasks without a route (none today) land here; the worker consumes it too.
QUEUE = "loyalty_sync"
TASK_ROUTES = {
    "loyalty_sync.webhooks.*": {"queue": WEBHOOKS_QUEUE},
    "loyalty_sync.syncs.*": {"queue": SYNCS_QUEUE},
    "loyalty_sync.stamps.*": {"queue": SYNCS_QUEUE},
    "loyalty_sync.maintenance.*": {"queue": SYNCS_QUEUE},
    "loyalty_sync.outbox.*": {"queue": OUTBOX_QUEUE},
}
EMBEDDED_BROKER_URL = "sqla+sqlite:///./var/celery-broker.sqlite"
BEAT_SCHEDULE_FILE = "./var/celerybeat-schedule"
TASK_MODULES = ("worker.tasks", "worker.scheduled")
RETENTION_SECONDS = 6 * 3600.0
# A drain task handles at most this many batches, then re-enqueues itself if more is due: time
# limits stay meaningful and other tasks get their turn.
SOFT_TIME_LIMIT = 240
TIME_LIMIT = 300


class _RedisChannel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # Since Celery 5.6 the consumer closes a lost broker connection *before* it restarts
        # its steps, and stopping a step can still open a client on a channel of that closed
        # connection (its `client` is then None): kombu's AttributeError there is an
        # "Unrecoverable error" that ends the worker (seen in CI with Redis stopped under
        # load). As a connection error it is what it is: ignored while closing, or one more
        # reconnection attempt.
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        params: dict[str, Any] = super()._connparams(asynchronous)  # type: ignore[no-untyped-call]
        return params


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, with a closed connection reported as a connection error."""

    Channel = _RedisChannel


REDIS_TRANSPORT = f"{__name__}:RedisTransport"


def broker_url(settings: Settings) -> str:
    """The broker: `CELERY_BROKER_URL`, else the embedded SQLite broker under `./var/`."""
    return settings.celery_broker_url or EMBEDDED_BROKER_URL


def is_sqla_broker(url: str) -> bool:
    return url.startswith(("sqla+", "sqlalchemy+"))


def ensure_broker_directory(url: str) -> None:
    """Create the directory of a SQLite broker file (e.g. `./var/`)."""
    if not is_sqla_broker(url):
        return
    parsed = make_url(url.split("+", 1)[1])
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The app's configuration for `settings` (a plain dict: tested on its own)."""
    url = broker_url(settings)
    embedded = is_sqla_broker(url)
    config: dict[str, Any] = {
        "broker_url": url,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_default_queue": QUEUE,
        "task_routes": TASK_ROUTES,
        "beat_schedule": beat_schedule(settings),
        "beat_schedule_filename": BEAT_SCHEDULE_FILE,
        # A task is acknowledged after it ran: a worker dying mid-task leaves the message
        # to be redelivered (and the rows it claimed to the sweeper).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": SOFT_TIME_LIMIT,
        "task_time_limit": TIME_LIMIT,
        "task_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        # Our logging set-up (worker/logging.py) stays in charge.
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        # The SQLAlchemy transport has no fanout: no remote control, gossip or mingle there.
        "worker_enable_remote_control": not embedded,
        "worker_send_task_events": False,
    }
    if embedded:
        # SQLite waits for the write lock instead of failing at once (API and worker share it).
        config["broker_transport_options"] = {"connect_args": {"timeout": 30}}
    else:
        # Redis: redeliver an unacknowledged message after the longest a task can run.
        config["broker_transport_options"] = {"visibility_timeout": TIME_LIMIT + 60}
        if url.startswith("redis://"):
            config["broker_transport"] = REDIS_TRANSPORT
    return config


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The periodic tasks, all in one place. Each message expires after its own period: a
    beat that ran while no worker consumed never leaves a pile of identical ticks behind."""

    def every(task: str, seconds: float) -> dict[str, Any]:
        return {"task": task, "schedule": seconds, "options": {"expires": max(seconds, 5.0)}}

    return {
        # Which connections are due for their incremental customer sync (own interval, jitter).
        "customer-syncs": every("loyalty_sync.syncs.dispatch", settings.sync_dispatch_seconds),
        "stamp-reconciliation": every(
            "loyalty_sync.stamps.reconcile_all", settings.reconcile_interval_seconds
        ),
        "outbox-delivery": every("loyalty_sync.outbox.deliver", settings.outbox_interval_seconds),
        "inbox-sweep": every("loyalty_sync.webhooks.sweep", settings.sweep_interval_seconds),
        "retention": every("loyalty_sync.maintenance.retention", RETENTION_SECONDS),
    }


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured from `settings` (the environment when None)."""
    celery = Celery(APP_NAME, include=list(TASK_MODULES), set_as_current=False)
    celery.conf.update(celery_config(settings or Settings()))
    return celery


# The broker URL this process's pools were made for (see `configure`).
_connected: dict[str, str | None] = {"url": None}


def configure(settings: Settings) -> Celery:
    """Re-configure the process-wide `app` from `settings` (the CLI does this once)."""
    config = celery_config(settings)
    # Compared with what this process last connected to, not `app.conf.broker_url`: Celery
    # answers that from the CELERY_BROKER_URL environment variable when it is set.
    if _connected["url"] != config["broker_url"]:
        _drop_broker_connections(app)
        _connected["url"] = config["broker_url"]
    app.conf.update(config)
    return app


def _drop_broker_connections(celery: Celery) -> None:
    """Forget pooled broker connections and producers (they belong to the previous URL)."""
    pool = celery._pool
    if pool is not None:
        pool.force_close_all()
    celery._pool = None
    amqp = celery.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    # kombu's process-wide connection and producer pools too (they hold the previous broker's).
    from kombu import pools

    pools.reset()  # type: ignore[no-untyped-call]


app = create_celery()
