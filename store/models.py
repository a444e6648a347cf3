"""SQLAlchemy 2 models of the worklist: one row per image (job and result), review audit events, feed cursors.

Privacy: these tables hold UIDs, the accession number, the study date and the modality of each image, and the
model's results; never a patient's name, ID, birth date or any pixel data (docs/security.md).
"""

import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# A job's life: pending -> processing -> done | flagged (OOD) | failed (three failures) ; done/flagged -> reviewed.
PENDING, PROCESSING, DONE, FLAGGED, FAILED, REVIEWED = "pending", "processing", "done", "flagged", "failed", "reviewed"
STATUSES = (PENDING, PROCESSING, DONE, FLAGGED, FAILED, REVIEWED)
UID_LENGTH = 64  # DICOM UIDs are at most 64 characters


def utc_now():
    """The current time in UTC, timezone-aware."""
    return datetime.datetime.now(datetime.timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of the store's tables."""


class Image(Base):
    """One DICOM image found on the PACS: its identity (UIDs only), its job state and its result."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))  # how a reader finds the study in the PACS
    study_date: Mapped[datetime.date | None] = mapped_column()
    modality: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)  # our own message, never a DICOM header value
    received_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    processed_at: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True))
    label: Mapped[str | None] = mapped_column(String(64))
    probabilities: Mapped[dict | None] = mapped_column(JSON)
    ood: Mapped[dict | None] = mapped_column(JSON)
    ood_flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    urgency: Mapped[float | None] = mapped_column(Float)
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(128))
    result_sr_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))  # the SR written back, when written
    heatmap_series_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    heatmap_sop_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    reviewed_by: Mapped[str | None] = mapped_column(String(128))
    reviewed_at: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_images_queue", "status", "lease_expires_at"),)


class ReviewEvent(Base):
    """Audit trail: who marked which image reviewed, and when (no patient data)."""

    __tablename__ = "review_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    action: Mapped[str] = mapped_column(String(32))
    user: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class FeedState(Base):
    """Where a change feed stands: Orthanc's /changes sequence number, or the QIDO poller's last poll."""

    __tablename__ = "feed_state"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class SeenStudy(Base):
    """QIDO polling's record of what it has seen: a study and how many instances it had then."""

    __tablename__ = "seen_studies"

    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), primary_key=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    seen_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
