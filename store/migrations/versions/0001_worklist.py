"""The worklist: images (jobs and results), review audit events, feed state, seen studies.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    """Create the four tables."""
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("accession_number", sa.String(16)),
        sa.Column("study_date", sa.Date()),
        sa.Column("modality", sa.String(16)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("last_error", sa.Text()),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True)),
        sa.Column("label", sa.String(64)),
        sa.Column("probabilities", sa.JSON()),
        sa.Column("ood", sa.JSON()),
        sa.Column("ood_flagged", sa.Boolean(), nullable=False),
        sa.Column("urgency", sa.Float()),
        sa.Column("model_name", sa.String(128)),
        sa.Column("model_version", sa.String(128)),
        sa.Column("result_sr_uid", sa.String(64)),
        sa.Column("heatmap_series_uid", sa.String(64)),
        sa.Column("heatmap_sop_uid", sa.String(64)),
        sa.Column("reviewed_by", sa.String(128)),
        sa.Column("reviewed_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_images_status", "images", ["status"])
    op.create_index("ix_images_study_instance_uid", "images", ["study_instance_uid"])
    op.create_index("ix_images_queue", "images", ["status", "lease_expires_at"])
    op.create_table(
        "review_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("user", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_review_events_image_id", "review_events", ["image_id"])
    op.create_table(
        "feed_state",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "seen_studies",
        sa.Column("study_instance_uid", sa.String(64), primary_key=True),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade():
    """Drop the four tables."""
    for table in ("seen_studies", "feed_state", "review_events", "images"):
        op.drop_table(table)
