"""Initial schema: caches, filter terms, events, disks, change feed, counters.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create every table of the first release."""
    op.create_table(
        "image_caches",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("doc", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("expire_time", TS, nullable=True),
        sa.Column("zones_pending", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("next_attempt_time", TS, nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=False, server_default=""),
        sa.Column("lease_expire_time", TS, nullable=True),
        sa.Column("last_event_sequence", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_image_caches_state", "image_caches", ["state"])
    op.create_index("ix_image_caches_expire_time", "image_caches", ["expire_time"])
    op.create_index("ix_image_caches_zones_pending", "image_caches", ["zones_pending"])
    op.create_table(
        "cache_terms",
        sa.Column(
            "cache_id", sa.String(32), sa.ForeignKey("image_caches.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("kind", sa.String(8), primary_key=True),
        sa.Column("value", sa.String(512), primary_key=True),
    )
    op.create_index("ix_cache_terms_lookup", "cache_terms", ["kind", "value", "cache_id"])
    op.create_table(
        "cache_events",
        sa.Column(
            "cache_id", sa.String(32), sa.ForeignKey("image_caches.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("sequence", sa.Integer(), primary_key=True),
        sa.Column("time", TS, nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
    )
    op.create_table(
        "disks",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("cache_id", sa.String(32), sa.ForeignKey("image_caches.id"), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("location", sa.Text(), nullable=False),
        sa.Column("snapshot_id", sa.String(128), nullable=False),
        sa.Column("holder", sa.String(256), nullable=False, server_default=""),
        sa.Column("create_time", TS, nullable=False),
    )
    op.create_index("ix_disks_cache_id", "disks", ["cache_id"])
    op.create_table(
        "changes",
        sa.Column("revision", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("cache_id", sa.String(32), nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("doc", sa.JSON(), nullable=False),
        sa.Column("time", TS, nullable=False),
    )
    op.create_index("ix_changes_cache_id", "changes", ["cache_id"])
    counters = op.create_table(
        "counters",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(counters, [{"name": "revision", "value": 0}])


def downgrade() -> None:
    """Drop everything (only for tests of the migration itself)."""
    for table in ("counters", "changes", "disks", "cache_events", "cache_terms", "image_caches"):
        op.drop_table(table)
