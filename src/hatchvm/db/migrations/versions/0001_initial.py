"""initial schema: api keys, images, vms

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from hatchvm.db.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False, index=True),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kernel_path", sa.Text(), nullable=False),
        sa.Column("vmlinux_path", sa.Text(), nullable=True),
        sa.Column("initrd_path", sa.Text(), nullable=True),
        sa.Column("rootfs_path", sa.Text(), nullable=False),
        sa.Column("boot_args", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "vms",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False, index=True),
        sa.Column("image_id", sa.String(32), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("vcpu_count", sa.Integer(), nullable=False),
        sa.Column("mem_mib", sa.Integer(), nullable=False),
        sa.Column("enable_network", sa.Boolean(), nullable=False),
        sa.Column("user_data", sa.Text(), nullable=True),
        sa.Column("boot_args", sa.Text(), nullable=True),
        sa.Column("guest_ip", sa.String(45), nullable=True, unique=True),
        sa.Column("guest_mac", sa.String(17), nullable=True, unique=True),
        sa.Column("tap_name", sa.String(15), nullable=True, unique=True),
        sa.Column("ssh_port", sa.Integer(), nullable=True, unique=True),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.Column("last_activity_at", UTCDateTime(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("vms")
    op.drop_table("images")
    op.drop_table("api_keys")
