"""Patient information beside the image (the thesis's second future direction): age, sex, view
position and any column a hospital adds, each encoded as a small integer and embedded.

Every field is a category: 0 means "missing", 1…K its known values (numbers are cut into bins).
The classifier learns one embedding per code, the missing one included, so a film without the
information still gets an answer, computed from what *was* given (training drops fields at random
for that). The encodings are fitted on the training split and stored in the model file
(:meth:`ClinicalSpec.to_dict`); values never seen in training are encoded as missing.

Where the values come from: manifest columns in training and evaluation; DICOM tags
(PatientAge, PatientSex, ViewPosition) or a CSV beside the images in ``predict``; form fields in
the API (:func:`values_from`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from pneumoscan.errors import PneumoScanError

#: Age bins in years (child, adolescent, adult decades, elderly): fixed, so they read the same
#: in every model card.
AGE_EDGES = (2.0, 12.0, 18.0, 30.0, 45.0, 60.0, 75.0)
#: Where the built-in fields come from in a DICOM header (``XrayImage.meta`` keys).
DICOM_KEYS = {"age": "patient_age", "sex": "patient_sex", "view": "view_position"}
EMBED_DIM = 4
MAX_CATEGORIES = 20
MIN_COUNT = 5


class ClinicalError(PneumoScanError, ValueError):
    """Patient information that cannot be used as asked (unknown field, unreadable CSV)."""


def parse_age(value: Any) -> float | None:
    """Age in years from a number or a DICOM Age String ("058Y", "006M", "010W", "003D");
    None when absent or not an age (negative, over 130)."""
    if value is None:
        return None
    text = str(value).strip().upper()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([YMWD]?)", text)
    if not match:
        return None
    years = float(match[1]) / {"": 1, "Y": 1, "M": 12, "W": 52.18, "D": 365.25}[match[2]]
    return years if 0 <= years <= 130 else None


def parse_category(field: str, value: Any) -> str | None:
    """A category as text in one spelling: sex → "F"/"M"/"O", view → its first word upper-cased
    ("AP Supine" → "AP"), any other field stripped; None when absent."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    if not text or text.lower() in ("nan", "none", "unknown", "?"):
        return None
    if field == "sex":
        return {"F": "F", "M": "M", "O": "O"}.get(text[0].upper())
    if field == "view":
        return text.split()[0].upper()
    return text


@dataclass
class Field:
    """One field's encoding: ``edges`` for numbers (code k+1 = bin k), ``values`` for categories."""

    name: str
    kind: str  # "numeric" | "category"
    edges: tuple[float, ...] = ()
    values: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Codes including 0 = missing."""
        return 1 + (len(self.edges) + 1 if self.kind == "numeric" else len(self.values))

    def code(self, value: Any) -> int:
        if self.kind == "numeric":
            number = parse_age(value) if self.name == "age" else _number(value)
            return 0 if number is None else 1 + int(np.searchsorted(self.edges, number, side="right"))
        text = parse_category(self.name, value)
        return self.values.index(text) + 1 if text in self.values else 0

    def describe(self) -> list[str]:
        """What each code means, for the model card and the model file."""
        if self.kind == "category":
            return ["missing", *self.values]
        cuts = ["-inf", *map(lambda e: f"{e:g}", self.edges), "inf"]
        return ["missing", *(f"[{lo}, {hi})" for lo, hi in zip(cuts, cuts[1:]))]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


@dataclass
class ClinicalSpec:
    """The fields a model fuses, in order, with their encodings."""

    fields: list[Field]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def encode(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """N×F int64 codes (0 = missing) from dicts of raw values (any may be absent)."""
        return np.array([[f.code(r.get(f.name)) for f in self.fields] for r in records], np.int64
                        ).reshape(len(records), len(self.fields))

    def present(self, codes: np.ndarray) -> dict[str, bool]:
        """Which fields one row of codes has (for the output: the values themselves stay out)."""
        return {f.name: bool(c) for f, c in zip(self.fields, codes)}

    def to_dict(self) -> dict[str, Any]:
        return {"fields": [{"name": f.name, "kind": f.kind, "edges": list(f.edges), "values": list(f.values),
                            "codes": f.describe()} for f in self.fields],
                "missing_code": 0, "embedding_dim": EMBED_DIM}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> ClinicalSpec:
        return cls([Field(f["name"], f["kind"], tuple(f.get("edges", ())), tuple(f.get("values", ())))
                    for f in spec["fields"]])


def parse_fields(text: str) -> list[str]:
    """``--clinical age,sex,view`` → field names (lower-case for the built-in ones)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    names = [n.lower() if n.lower() in DICOM_KEYS else n for n in names]
    if not names or len(set(names)) != len(names):
        raise ClinicalError(f"--clinical {text!r}: give distinct comma-separated fields, e.g. age,sex,view")
    return names


def fit_spec(table, names: list[str]) -> ClinicalSpec:
    """Encodings from the training rows: age in :data:`AGE_EDGES`; another column numeric (5
    quantile bins) when most of its given values are numbers, else its categories seen at least
    :data:`MIN_COUNT` times (at most :data:`MAX_CATEGORIES`)."""
    fields = []
    for name in names:
        if name not in table:
            raise ClinicalError(f"--clinical field {name!r} is not a manifest column "
                                f"(columns: {', '.join(map(str, table.columns))})")
        column = table[name]
        if name == "age":
            fields.append(Field(name, "numeric", AGE_EDGES))
            continue
        given = column.dropna()
        numbers = given.map(_number).dropna() if name not in DICOM_KEYS else given.iloc[:0]
        if len(given) and len(numbers) >= 0.8 * len(given):
            edges = tuple(sorted(set(np.round(np.quantile(numbers.astype(float), [0.2, 0.4, 0.6, 0.8]), 6))))
            fields.append(Field(name, "numeric", edges))
            continue
        counts = given.map(lambda v, name=name: parse_category(name, v)).dropna().value_counts()
        values = tuple(sorted(counts[counts >= MIN_COUNT].index[:MAX_CATEGORIES].astype(str)))
        if not values:
            raise ClinicalError(f"--clinical field {name!r}: no value occurs {MIN_COUNT} times in the "
                                f"training rows, so nothing about it can be learnt")
        fields.append(Field(name, "category", values=values))
    return ClinicalSpec(fields)


def table_records(table, names: list[str]) -> list[dict[str, Any]]:
    """Manifest rows → the raw values of ``names`` (NaN as absent)."""
    return [{n: (None if isinstance(v, float) and np.isnan(v) else v) for n, v in zip(names, values)}
            for values in table[names].itertuples(index=False, name=None)]


def values_from(meta: Mapping[str, Any] | None, given: Mapping[str, Any] | None, names: list[str]
                ) -> dict[str, Any]:
    """One image's raw values: what the caller gave (CSV row, form fields) first, else the DICOM
    header's tag for the built-in fields."""
    meta, given = meta or {}, given or {}
    out = {}
    for name in names:
        value = given.get(name)
        if value in (None, "") and name in DICOM_KEYS:
            value = meta.get(DICOM_KEYS[name])
        out[name] = None if value in (None, "") else value
    return out


def read_clinical_csv(path: str | Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """A CSV beside the images: a ``file`` (or ``path``) column naming each image (its file name
    is matched), and one column per field; returns {file name: {field: value}}."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ClinicalError(f"cannot read the clinical CSV {path}: {exc}") from exc
    key = next((c for c in ("file", "path", "filename") if c in table), None)
    if key is None:
        raise ClinicalError(f"{path}: the clinical CSV needs a 'file' column naming each image")
    unused = [n for n in names if n not in table]
    if len(unused) == len(names):
        raise ClinicalError(f"{path}: none of the model's fields ({', '.join(names)}) is a column")
    return {Path(str(f)).name: {n: rec.get(n) or None for n in names}
            for f, rec in zip(table[key], table.to_dict("records"))}


class ClinicalEncoder(nn.Module):
    """N×F codes → N×(F·EMBED_DIM) embeddings; row 0 of each table is that field's "missing"."""

    def __init__(self, spec: ClinicalSpec):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(f.size, EMBED_DIM) for f in spec.fields)

    @property
    def dim(self) -> int:
        return len(self.tables) * EMBED_DIM

    @property
    def embeddings(self) -> list[nn.Embedding]:
        """The tables, one per field, typed as what they are."""
        return [cast(nn.Embedding, table) for table in self.tables]

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([table(codes[:, k]) for k, table in enumerate(self.tables)], dim=1)


def drop_fields(codes: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Training: each field of each row set to missing with probability ``rate``, so the missing
    embedding is learnt on films of every source, not only on those that never have the field."""
    keep = torch.rand(codes.shape, generator=generator) >= rate
    return codes * keep.to(codes.device)
