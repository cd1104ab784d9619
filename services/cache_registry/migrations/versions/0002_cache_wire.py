"""Wire form per cache version: `image_caches.wire` and `image_caches.wire_format`.

Rows written before this revision have neither; readers decode their document instead, and the
lifecycle worker fills them in (see `store.caches_without_wire`). No data is rewritten here: the
encoding belongs to the gRPC edge, which a migration does not import.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the two nullable columns (a metadata-only change on SQLite and PostgreSQL)."""
    op.add_column("image_caches", sa.Column("wire", sa.LargeBinary(), nullable=True))
    op.add_column("image_caches", sa.Column("wire_format", sa.String(64), nullable=True))


def downgrade() -> None:
    """Drop them again (only for tests of the migration itself).

    A plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): batch mode would copy and drop the table,
    and with foreign keys on, dropping it deletes the terms and events that reference it.
    """
    op.drop_column("image_caches", "wire_format")
    op.drop_column("image_caches", "wire")
