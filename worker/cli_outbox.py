"""CLI commands of the outbox area, registered on the groups of `worker.cli`.

loyalty-sync outbox list [--status S] [--store ID] [--kind K] [--limit N] [--json]
loyalty-sync outbox retry ID | --status failed|skipped [--store ID]
loyalty-sync outbox deliver [--limit N]
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from worker.cli import _secret_key, _settings, app, database, emit, fail, transaction

outbox_app = typer.Typer(
    help="The outbox: card links, pass updates and pushes to deliver.", no_args_is_help=True
)
app.add_typer(outbox_app, name="outbox")


class OutboxStatus(StrEnum):
    pending = "pending"
    sending = "sending"
    delivered = "delivered"
    failed = "failed"
    skipped = "skipped"


class RetryStatus(StrEnum):
    failed = "failed"
    skipped = "skipped"


class OutboxKind(StrEnum):
    card_links = "card_links"
    pass_update = "pass_update"  # noqa: S105 - a kind name, not a secret
    push = "push"


@outbox_app.command("list")
def outbox_list(
    ctx: typer.Context,
    status: Annotated[
        OutboxStatus | None, typer.Option("--status", help="Only this status")
    ] = None,
    store: Annotated[int | None, typer.Option("--store", help="Only this store's")] = None,
    kind: Annotated[OutboxKind | None, typer.Option("--kind", help="Only this kind")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list on stdout")] = False,
) -> None:
    """List outbox rows, newest first (state and per-channel progress, no contact data)."""
    from models.outbox import list_messages, render_message

    with transaction(ctx) as session:
        rows = list_messages(
            session,
            status=status.value if status else None,
            store_id=store,
            kind=kind.value if kind else None,
            limit=limit,
        )
        result = [render_message(m) for m in rows]
    if as_json:
        emit(result)
        return
    if not result:
        typer.echo("No outbox rows.")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Outbox")
    columns = ("id", "store", "kind", "status", "attempts", "channels", "next attempt", "error")
    for column in columns:
        table.add_column(column)
    for m in result:
        table.add_row(
            str(m["id"]),
            str(m["store_id"]),
            m["kind"],
            m["status"],
            str(m["attempts"]),
            ", ".join(f"{k}={v}" for k, v in m["channels"].items()),
            m["next_attempt_at"] or "",
            m["last_error"] or "",
        )
    Console(width=200).print(table)


@outbox_app.command("retry")
def outbox_retry(
    ctx: typer.Context,
    message_id: Annotated[
        int | None, typer.Argument(metavar="[ID]", help="Retry this outbox row")
    ] = None,
    status: Annotated[
        RetryStatus | None,
        typer.Option("--status", help="Retry every row of this status (failed or skipped)"),
    ] = None,
    store: Annotated[int | None, typer.Option("--store", help="Only this store's rows")] = None,
) -> None:
    """Put rows back to pending (attempts reset, due now): one row by id, or all of a status.

    Channels already delivered are never repeated; channels that failed or whose outcome is
    unknown are attempted again."""
    from models.outbox import retry
    from models.tables import OutboxMessage

    if (message_id is None) == (status is None):
        fail("give exactly one of ID or --status", code=2)
    with transaction(ctx) as session:
        if message_id is not None:
            row = session.get(OutboxMessage, message_id)
            if row is None:
                fail(f"outbox row {message_id} not found")
            if row.status in ("pending", "sending"):
                fail(f"outbox row {message_id} is {row.status}; nothing to retry")
        ids = retry(
            session,
            message_id=message_id,
            status=status.value if status else None,
            store_id=store,
        )
    emit({"retried": len(ids), "ids": ids})


@outbox_app.command("deliver")
def outbox_deliver(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Rows to claim at most")] = 100,
) -> None:
    """Run one delivery pass in this process (what the worker's periodic task does)."""
    from models.db import make_sessionmaker
    from worker.outbox import deliver_due, parse_smtp_url

    settings = _settings(ctx)
    if settings.smtp_url is not None and settings.smtp_url.get_secret_value():
        try:
            parse_smtp_url(settings.smtp_url.get_secret_value())
        except ValueError as exc:
            fail(f"invalid configuration: {exc}")
    key = _secret_key(ctx)
    with database(ctx) as engine:
        summary = deliver_due(make_sessionmaker(engine), settings=settings, key=key, limit=limit)
    emit(summary)
