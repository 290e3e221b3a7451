"""routes

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from hatchvm.db.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "routes",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "vm_id",
            sa.String(32),
            sa.ForeignKey("vms.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("user_id", sa.String(128), nullable=False, index=True),
        sa.Column("subdomain", sa.String(63), nullable=False, unique=True),
        sa.Column("target_port", sa.Integer(), nullable=False),
        sa.Column("auto_wake", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("routes")
