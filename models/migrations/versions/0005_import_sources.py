"""connections: the import sources appystamp and loke

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 08:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "source IN ('shopify', 'square')"
NEW = "source IN ('shopify', 'square', 'appystamp', 'loke')"


def _replace_check(condition: str) -> None:
    # batch mode: SQLite can't alter a constraint in place (the table is copied).
    with op.batch_alter_table("connections", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_connections_source"), type_="check")
        batch_op.create_check_constraint(op.f("ck_connections_source"), condition)


def upgrade() -> None:
    _replace_check(NEW)


def downgrade() -> None:
    op.execute("DELETE FROM connections WHERE source IN ('appystamp', 'loke')")
    _replace_check(OLD)
