"""order earnings: what each source order/payment earned, and how it arrived

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "order_earnings",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("store_id", BIG_ID, nullable=False),
        sa.Column("connection_id", BIG_ID, nullable=True),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("external_id", sa.String(length=255), nullable=False),
        sa.Column("customer_external_id", sa.String(length=255), nullable=True),
        sa.Column("customer_card_id", BIG_ID, nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("paid", sa.Boolean(), nullable=False),
        sa.Column("cancelled", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("earned", sa.Integer(), nullable=False),
        sa.Column("reversed", sa.Integer(), nullable=False),
        sa.Column("shortfall", sa.Integer(), nullable=False),
        sa.Column(
            "refunds",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("source_updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["connections.id"],
            name=op.f("fk_order_earnings_connection_id_connections"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["customer_card_id"],
            ["customer_cards.id"],
            name=op.f("fk_order_earnings_customer_card_id_customer_cards"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["store_id"],
            ["stores.id"],
            name=op.f("fk_order_earnings_store_id_stores"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_order_earnings")),
        sa.UniqueConstraint(
            "store_id",
            "source",
            "external_id",
            name=op.f("uq_order_earnings_store_id_source_external_id"),
        ),
    )
    op.create_index(
        "ix_order_earnings_connection_id_first_seen_at",
        "order_earnings",
        ["connection_id", "first_seen_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_order_earnings_customer_card_id"),
        "order_earnings",
        ["customer_card_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_order_earnings_customer_card_id"), table_name="order_earnings")
    op.drop_index("ix_order_earnings_connection_id_first_seen_at", table_name="order_earnings")
    op.drop_table("order_earnings")
