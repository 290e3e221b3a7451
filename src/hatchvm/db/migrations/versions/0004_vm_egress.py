"""vm egress

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # VMs made before egress existed keep the default they were created under: the internet.
    op.add_column(
        "vms",
        sa.Column("egress", sa.String(16), nullable=False, server_default="internet"),
    )


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("egress")
