"""blob: every stored blob, so the sweep deletes those no model, dataset or artifact names

Revision ID: 0004
Revises: 0003
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

REFERRERS = ("model", "dataset", "artifact")


def upgrade() -> None:
    blob = op.create_table(
        "blob",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    for table in REFERRERS:
        op.create_index(f"ix_{table}_blob_key", table, ["blob_key"], unique=False)
    # Blobs stored before this revision: each referenced key once, with its largest size.
    referenced = sa.union_all(
        *(
            sa.select(sa.column("blob_key"), sa.column("size")).select_from(sa.table(t))
            for t in REFERRERS
        )
    ).subquery()
    now = datetime.now(UTC)
    rows = op.get_bind().execute(
        sa.select(referenced.c.blob_key, sa.func.max(referenced.c.size)).group_by(
            referenced.c.blob_key
        )
    )
    op.bulk_insert(blob, [{"key": k, "size": s, "stored_at": now} for k, s in rows])


def downgrade() -> None:
    for table in REFERRERS:
        op.drop_index(f"ix_{table}_blob_key", table_name=table)
    op.drop_table("blob")
