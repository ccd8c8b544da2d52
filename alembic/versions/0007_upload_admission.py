"""upload_admission: the uploads the rate let in, counted over its window

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "upload_admission",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("admitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_upload_admission_tenant_at",
        "upload_admission",
        ["tenant_id", "admitted_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_upload_admission_tenant_at", table_name="upload_admission")
    op.drop_table("upload_admission")
