"""CLI commands of the stamps area, registered on the groups of `worker.cli`.

loyalty-sync connection configure ID --card CARD_ID --earn per_order:N|per_amount:MINOR_UNITS
    [--min-amount MINOR_UNITS] [--currency XXX]
loyalty-sync stamps reconcile --store ID [--dry-run] [--json]
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import typer

from worker.cli import _secret_key, _settings, app, database, emit, fail, transaction

connection_app = typer.Typer(help="One connection: its earning rule.", no_args_is_help=True)
stamps_app = typer.Typer(help="Stamps from orders: reconciliation.", no_args_is_help=True)
app.add_typer(connection_app, name="connection")
app.add_typer(stamps_app, name="stamps")


@connection_app.command("configure")
def connection_configure(
    ctx: typer.Context,
    connection_id: Annotated[int, typer.Argument(metavar="ID", help="Connection id")],
    card: Annotated[int, typer.Option("--card", help="The card (template) id to earn on")],
    earn: Annotated[
        str,
        typer.Option(
            "--earn",
            help="per_order:N (N stamps per order) or per_amount:MINOR_UNITS (1 stamp per "
            "MINOR_UNITS of net paid amount, e.g. per_amount:500 = 1 per $5.00)",
        ),
    ],
    min_amount: Annotated[
        int | None,
        typer.Option("--min-amount", help="Orders paying less (minor units) earn nothing"),
    ] = None,
    currency: Annotated[
        str | None,
        typer.Option("--currency", help="Only orders in this ISO 4217 currency earn"),
    ] = None,
) -> None:
    """Set the connection's earning rule; prints the connection (with `earning`) as JSON."""
    from models.connections import render_connection
    from models.earning import configure_earning, parse_earn, render_earning
    from models.errors import ValidationFailed

    try:
        spec = parse_earn(earn)
    except ValidationFailed as exc:
        fail(str(exc), code=2)
    with transaction(ctx) as session:
        connection = configure_earning(session, connection_id, card, spec, min_amount, currency)
        result: dict[str, Any] = {
            **render_connection(connection),
            "earning": render_earning(connection),
        }
    emit(result)


def _human(result: dict[str, Any]) -> str:
    lines = [
        f"store {result['store_id']}: {result['status']}"
        + (" (dry run: nothing written)" if result["dry_run"] else ""),
    ]
    for c in result["connections"]:
        done = c["completeness"]
        lines.append(
            f"  connection {c['connection_id']} ({c['source']} {c['account']}): {c['status']};"
            f" orders {c['orders']}, missed by webhooks {c['missed']}"
            f" ({c['miss_rate']:.1%}), stamps +{c['stamps_earned']} -{c['stamps_reversed']};"
            f" source {done['source_count']} vs local {done['local_count']}"
            + (f"; error: {c['error']}" if c["error"] else "")
        )
    lines.append(f"  balance drift: {len(result['drift'])} card(s)")
    return "\n".join(lines)


@stamps_app.command("reconcile")
def stamps_reconcile(
    ctx: typer.Context,
    store: Annotated[int, typer.Option("--store", help="Store id")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would change; write nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The report as JSON on stdout")] = False,
    window_hours: Annotated[
        float | None,
        typer.Option("--window-hours", help="Look-back window (default RECONCILE_WINDOW_HOURS)"),
    ] = None,
) -> None:
    """Re-pull the store's recent orders/payments, apply what webhooks missed, verify balances.

    Exit code 1 when a connection failed (the report still lists what was done)."""
    from models.db import make_sessionmaker
    from worker.reconcile import reconcile_store

    settings = _settings(ctx)
    hours = window_hours if window_hours is not None else settings.reconcile_window_hours
    if hours <= 0:
        fail("--window-hours must be positive", code=2)
    key = _secret_key(ctx)
    with database(ctx) as engine:
        result = reconcile_store(
            make_sessionmaker(engine),
            store_id=store,
            settings=settings,
            key=key,
            window=dt.timedelta(hours=hours),
            dry_run=dry_run,
        )
    if as_json:
        emit(result)
    else:
        typer.echo(_human(result))
    if result["status"] != "succeeded":
        raise typer.Exit(1)


__all__ = ["connection_app", "stamps_app"]
