"""The results store's tables (SQLAlchemy 2 declarative; created and changed only by the Alembic
migrations in ``migrations/``, never by ``create_all``).

Films are known by the SHA-256 of their file and their DICOM UIDs, never by a patient's name or
ID: ``patient_key`` is a salted hash (the salt is this store's own, in ``store_meta``), kept only
so that an export can split a site's films by patient. A result is one film read by one set of
models (``models_key``: SHA-256 over the models' SHA-256s and options), so the same film and
models twice is one row. Reviews are append-only: a reader's later review of a result
supersedes the earlier one (``seq`` counts them), nothing is ever overwritten.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)
SHA = String(64)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, list[Any]: JSON}


class StoreMeta(Base):
    """Settings of this store (its patient-key salt)."""

    __tablename__ = "store_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Film(Base):
    __tablename__ = "films"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(SHA, unique=True)
    display_name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str | None] = mapped_column(Text)
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_uid: Mapped[str | None] = mapped_column(UID)
    sop_uid: Mapped[str | None] = mapped_column(UID, index=True)
    patient_key: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("film_id", "models_key", name="uq_result_film_models"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    film_id: Mapped[int] = mapped_column(ForeignKey("films.id"), index=True)
    models_key: Mapped[str] = mapped_column(SHA)
    models: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    verdict: Mapped[str | None] = mapped_column(String(32))  # 0003: "no finding called" needs 17
    population: Mapped[str | None] = mapped_column(String(16))
    #: the called labels as ``|A|B|`` (a filter by finding is one LIKE on SQLite and PostgreSQL)
    findings: Mapped[str] = mapped_column(String(400))
    probabilities: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    thresholds: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    thresholds_from: Mapped[str | None] = mapped_column(Text)
    calibrated_for: Mapped[str | None] = mapped_column(Text)
    record: Mapped[dict[str, Any]] = mapped_column(JSON)
    overlay: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    film: Mapped[Film] = relationship()


class Layers(Base):
    """What the review page draws: a small JPEG of the film and, in its pixels, the lung and
    heart outlines and one colour heat map (PNG with alpha) per explained label."""

    __tablename__ = "layers"
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), primary_key=True)
    preview: Mapped[bytes] = mapped_column(LargeBinary)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    scale: Mapped[float] = mapped_column(Float)
    lungs: Mapped[list[Any]] = mapped_column(JSON)
    heart: Mapped[list[Any]] = mapped_column(JSON)
    heat: Mapped[dict[str, Any]] = mapped_column(JSON)


class Reader(Base):
    __tablename__ = "readers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    key_sha256: Mapped[str | None] = mapped_column(SHA, unique=True)
    adjudicator: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Review(Base):
    __tablename__ = "reviews"
    __table_args__ = (UniqueConstraint("result_id", "reader_id", "seq", name="uq_review_seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("readers.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    submission: Mapped[str | None] = mapped_column(String(64), unique=True)
    labels: Mapped[list[Any]] = mapped_column(JSON)
    box: Mapped[list[Any] | None] = mapped_column(JSON)
    note: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    verdicts: Mapped[list[Verdict]] = relationship(order_by="Verdict.label")
    reader: Mapped[Reader] = relationship()


class Verdict(Base):
    __tablename__ = "verdicts"
    __table_args__ = (UniqueConstraint("review_id", "label", name="uq_verdict_label"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    review_id: Mapped[int] = mapped_column(ForeignKey("reviews.id"), index=True)
    label: Mapped[str] = mapped_column(String(32))
    verdict: Mapped[str] = mapped_column(String(16))


# --- reader studies (revision 0002) ----------------------------------------------------------------


class Study(Base):
    """An MRMC reader study: cases (stored results with their truth), readers, arms.
    ``design`` sequential (each case unaided, then aided, in one sitting) or crossover (every case
    unaided, then after ``washout_days`` every case aided; or the other way for half the readers)."""

    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    design: Mapped[str] = mapped_column(String(16))
    washout_days: Mapped[float] = mapped_column(Float)
    targets: Mapped[list[Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StudyCase(Base):
    __tablename__ = "study_cases"
    __table_args__ = (UniqueConstraint("study_id", "result_id", name="uq_study_case"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"))
    truth: Mapped[dict[str, Any]] = mapped_column(JSON)


class StudyStep(Base):
    """One reading a reader owes: a case in an arm, at its place in the reader's seeded order."""

    __tablename__ = "study_steps"
    __table_args__ = (UniqueConstraint("study_id", "reader_id", "position", name="uq_study_step"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("readers.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    case_id: Mapped[int] = mapped_column(ForeignKey("study_cases.id"))
    arm: Mapped[str] = mapped_column(String(16))
    #: the first step of a crossover's second arm waits this long after the reader's last reading
    washout_before: Mapped[bool] = mapped_column(Boolean, default=False)


class StudyRating(Base):
    """A reader's rating of one step and target (append-only: a correction is a new row with the
    next ``seq`` and its reason)."""

    __tablename__ = "study_ratings"
    __table_args__ = (UniqueConstraint("step_id", "target", "seq", name="uq_study_rating"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("study_steps.id"), index=True)
    target: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    call: Mapped[bool] = mapped_column(Boolean)
    seconds: Mapped[float | None] = mapped_column(Float)
    correction: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
