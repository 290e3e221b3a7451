"""vm restart policy and last exit

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("restart", sa.String(16), nullable=False, server_default="no"))
        batch.add_column(sa.Column("last_exit", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("last_exit")
        batch.drop_column("restart")
