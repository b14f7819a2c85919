"""What the results store is given (a film's identity, the review page's layers of a result) and
the small conversions every part of the store shares: UTC times, the key of a run's models, the
digest a reader's key is kept as."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


def now() -> datetime:
    return datetime.now(timezone.utc)


def aware(moment: datetime) -> datetime:
    """SQLite gives back naive datetimes; every time in the store is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def models_key(run: dict[str, Any]) -> str:
    """One result per film per ``run`` (the models' SHA-256s and the options that change an answer)."""
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class FilmIdentity:
    """How the store knows a film: never by a patient's name or ID (see :mod:`.identity`)."""

    sha256: str
    display_name: str
    path: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    patient_id: str | None = None  # only ever stored salted and hashed (``patient_key``)


@dataclass(frozen=True)
class LayerData:
    preview: bytes
    width: int
    height: int
    scale: float
    lungs: list
    heart: list
    heat: dict[str, str]
