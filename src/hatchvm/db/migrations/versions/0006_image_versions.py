"""image versions: VMs pin the image content they were made with

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("version", sa.String(32), nullable=True))
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("image_version", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("image_version")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("version")
