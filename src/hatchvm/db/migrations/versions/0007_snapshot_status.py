"""snapshot status: a snapshot is listed once captured, while its files are still being stored

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
    with op.batch_alter_table("snapshots") as batch:
        # Every snapshot before this one was written only once stored.
        batch.add_column(
            sa.Column("status", sa.String(16), nullable=False, server_default="stored")
        )
        batch.add_column(sa.Column("status_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("snapshots") as batch:
        batch.drop_column("status_reason")
        batch.drop_column("status")
