"""Readers' reviews as labels and as agreement figures (pure functions over the store's rows).

A review holds, per assessed label, the reader's verdict on the model's call (agree, disagree,
unsure) and the reader's own labels: the film's complete list of findings as the reader reads it
(any of the 15; "No Finding" alone or not at all). A label a reader was unsure of is unknown for
that reader; every other label is 1 when listed, else 0. A verdict must match the labels (agree
with a call = listed; disagree with a call = not listed), so that one review never says two things.

Labels per film: the majority of the readers who know it (a tie is left empty and the film is
listed as disagreed), or a named adjudicator's where they read the film. Agreement: Cohen's kappa
between the model's calls and each reader (and pooled over readers), sensitivity and specificity
of the model against the readers' majority, and Cohen's kappa between each pair of readers.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import pandas as pd

from pneumoscan.errors import PneumoScanError
from pneumoscan.labels import LABELS
from pneumoscan.store.db import REVIEW_VERDICTS

NO_FINDING = "No Finding"
MAX_NOTE = 2000
SUBMISSION = re.compile(r"[A-Za-z0-9_-]{8,64}")


class ReviewError(PneumoScanError, ValueError):
    """A review that cannot be stored as sent (answered 422)."""


def assessed(record: dict[str, Any]) -> list[str]:
    """The labels the model assessed on this film (those with a threshold), in label order."""
    thresholds = record.get("thresholds") or {}
    return [label for label in LABELS if thresholds.get(label) is not None] if record.get("probabilities") else []


def called(record: dict[str, Any]) -> set[str]:
    return set(record.get("findings") or [])


def check_review(body: Any, record: dict[str, Any]) -> dict[str, Any]:
    """The review as it will be stored, or :class:`ReviewError` saying what is wrong with it."""
    if not isinstance(body, dict):
        raise ReviewError("a review is a JSON object")
    unknown = set(body) - {"verdicts", "labels", "box", "note", "seconds", "submission"}
    if unknown:
        raise ReviewError(f"unknown fields {sorted(unknown)}")
    verdicts, labels = body.get("verdicts") or {}, body.get("labels")
    if not isinstance(verdicts, dict) or not all(isinstance(v, str) for v in verdicts.values()):
        raise ReviewError("'verdicts' maps each assessed label to agree, disagree or unsure")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ReviewError("'labels' is the list of your findings (any of the 15 labels, or No Finding)")
    wanted = assessed(record)
    missing, extra = sorted(set(wanted) - set(verdicts)), sorted(set(verdicts) - set(wanted))
    if missing or extra:
        raise ReviewError(f"give a verdict on each assessed label ({', '.join(wanted) or 'none on this film'})"
                          + (f"; missing {', '.join(missing)}" if missing else "")
                          + (f"; not assessed here: {', '.join(extra)}" if extra else ""))
    bad = sorted({v for v in verdicts.values()} - set(REVIEW_VERDICTS))
    if bad:
        raise ReviewError(f"a verdict is one of {', '.join(REVIEW_VERDICTS)}, not {', '.join(bad)}")
    strange = sorted(set(labels) - set(LABELS))
    if strange:
        raise ReviewError(f"unknown labels {strange}")
    labels = [label for label in LABELS if label in labels]
    if NO_FINDING in labels and len(labels) > 1:
        raise ReviewError("No Finding cannot be given together with a finding")
    if not labels and "unsure" not in verdicts.values():
        raise ReviewError("give your findings, or No Finding")
    calls = called(record)
    for label, verdict in verdicts.items():
        if verdict == "unsure":
            continue
        should_list = (label in calls) == (verdict == "agree")
        if should_list != (label in labels):
            raise ReviewError(f"{label}: you {verdict} with the model's "
                              f"{'call' if label in calls else 'no call'}, so your labels must "
                              f"{'' if should_list else 'not '}include it")
    return {"verdicts": verdicts, "labels": labels, "box": check_box(body.get("box"), record),
            "note": check_note(body.get("note")), "seconds": check_seconds(body.get("seconds")),
            "submission": check_submission(body.get("submission"))}


def check_box(box: Any, record: dict[str, Any]) -> list[int] | None:
    if box is None:
        return None
    size = record.get("image") or {}
    width, height = size.get("width"), size.get("height")
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
            or not (0 <= box[0] < box[2]) or not (0 <= box[1] < box[3])
            or (width and box[2] > width) or (height and box[3] > height)):
        raise ReviewError(f"'box' is [x0, y0, x1, y1] in the film's pixels, inside {width}×{height}")
    return [round(v) for v in box]


def check_note(note: Any) -> str | None:
    if note is None or note == "":
        return None
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise ReviewError(f"'note' is text of at most {MAX_NOTE} characters")
    if "\x00" in note:  # PostgreSQL's text cannot hold it: the same rule on every database
        raise ReviewError("'note' cannot contain a NUL character")
    return note


def check_seconds(seconds: Any) -> float | None:
    if seconds is None:
        return None
    if not isinstance(seconds, int | float) or not 0 <= seconds <= 86400:
        raise ReviewError("'seconds' (time spent) is a number of seconds from 0 to 86400")
    return float(seconds)


def check_submission(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not SUBMISSION.fullmatch(value):
        raise ReviewError("'submission' is 8 to 64 letters, digits, - or _ (one per review, for retries)")
    return value


def truth(review: dict[str, Any]) -> dict[str, float]:
    """One review as labels: 1, 0, or NaN (unsure)."""
    listed, verdicts = set(review["labels"]), review["verdicts"]
    if listed:
        values = {label: float(label in listed) for label in LABELS}
    else:  # nothing listed (some verdict unsure): only the definite verdicts say anything
        values = {label: 0.0 if verdicts.get(label) in ("agree", "disagree") else np.nan for label in LABELS}
    for label, verdict in verdicts.items():
        if verdict == "unsure":
            values[label] = np.nan
    return values


def current_reviews(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per current review (a reader's latest of each result), its labels as columns."""
    current = [row for row in rows if row["current"]]
    table = pd.DataFrame([{k: row[k] for k in ("id", "reader", "adjudicator", "result_id", "models_key", "film_id",
                                               "sha256", "path", "display_name", "study_uid", "sop_uid",
                                               "patient_key", "created_at")} | truth(row) for row in current],
                         columns=["id", "reader", "adjudicator", "result_id", "models_key", "film_id", "sha256", "path",
                                  "display_name", "study_uid", "sop_uid", "patient_key", "created_at", *LABELS])
    table.attrs["records"] = {row["result_id"]: row["record"] for row in current}
    return table


def film_labels(reviews: pd.DataFrame, adjudicator: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labels per film (majority, or ``adjudicator`` where they read it), and the films whose
    readers disagreed (label, readers for, readers against)."""
    if reviews.empty:
        return (pd.DataFrame(columns=["film_id", "readers", *LABELS]),
                pd.DataFrame(columns=["film_id", "label", "positive", "negative"]))
    latest = reviews.sort_values("id").groupby(["film_id", "reader"], as_index=False).last()
    films, disagreements = [], []
    for film_id, group in latest.groupby("film_id", sort=True):
        row = {"film_id": film_id, "readers": "|".join(sorted(group["reader"]))}
        judge = group[group["reader"] == adjudicator] if adjudicator else group.iloc[0:0]
        for label in LABELS:
            values = group[label].dropna()
            yes, no = int((values == 1).sum()), int((values == 0).sum())
            if yes and no:
                disagreements.append({"film_id": film_id, "label": label, "positive": yes, "negative": no})
            if not judge.empty and not np.isnan(judge[label].iloc[0]):
                row[label] = judge[label].iloc[0]
            else:
                row[label] = 1.0 if yes > no else 0.0 if no > yes else np.nan
        films.append(row)
    return pd.DataFrame(films), pd.DataFrame(disagreements, columns=["film_id", "label", "positive", "negative"])


def export_manifest(reviews: pd.DataFrame, *, adjudicator: str | None = None, split: str = "val",
                    source: str = "site") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A manifest (:data:`pneumoscan.data.manifest.MANIFEST_COLUMNS`, plus the film's SHA-256 and
    UIDs, its readers and the labels they disagreed on) of the reviewed films whose stored path
    still holds them (:func:`path_mismatch`); the films left out and why (no path: uploaded or
    received over the network without a kept copy; gone; replaced); the disagreements."""
    from pneumoscan.data.manifest import MANIFEST_COLUMNS, path_mismatch

    labels, disagreements = film_labels(reviews, adjudicator)
    if labels.empty:
        return pd.DataFrame(columns=[*MANIFEST_COLUMNS, "sha256", "study_uid", "sop_uid", "readers", "disagreement"]), \
            pd.DataFrame(columns=["sha256", "display_name", "reason"]), disagreements
    films = reviews.sort_values("id").groupby("film_id").last()
    records = reviews.attrs.get("records", {})
    rows, left_out = [], []
    disagreed = disagreements.groupby("film_id")["label"].agg("|".join) if not disagreements.empty else {}
    for _, row in labels.iterrows():
        film = films.loc[row["film_id"]]
        record = records.get(film["result_id"], {})
        population, image = record.get("population") or {}, record.get("image") or {}
        missing = path_mismatch(film["path"], film["sha256"])  # the labels go with the film, not the name
        if missing:
            left_out.append({"sha256": film["sha256"], "display_name": film["display_name"], "reason": missing})
            continue
        rows.append({"path": film["path"], "source": source, "patient": film["patient_key"] or film["sha256"][:32],
                     "view": image.get("view_position") or "", "age": population.get("age"), "sex": "",
                     "split": split, **{label: row[label] for label in LABELS}, "mask": "",
                     "sha256": film["sha256"], "study_uid": film["study_uid"] or "", "sop_uid": film["sop_uid"] or "",
                     "readers": row["readers"], "disagreement": disagreed.get(row["film_id"], "")})
    columns = [*MANIFEST_COLUMNS, "sha256", "study_uid", "sop_uid", "readers", "disagreement"]
    if not disagreements.empty:  # found by the name the reader knows, and opened on the review page
        disagreements = disagreements.assign(
            display_name=[films.loc[f, "display_name"] for f in disagreements["film_id"]],
            result_id=[int(films.loc[f, "result_id"]) for f in disagreements["film_id"]])
        disagreements["review_page"] = [f"/review#result={r}" for r in disagreements["result_id"]]
    return (pd.DataFrame(rows, columns=columns), pd.DataFrame(left_out, columns=["sha256", "display_name", "reason"]),
            disagreements)


def _kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cohen's kappa of two 0/1 raters (None when undefined: fewer than 2 films or no variation)."""
    from sklearn.metrics import cohen_kappa_score

    if len(a) < 2:
        return None
    if len(set(a.tolist()) | set(b.tolist())) < 2:
        return None  # both constant and equal: kappa is 0/0
    value = cohen_kappa_score(a, b)
    return None if np.isnan(value) else round(float(value), 4)


def agreement(reviews: pd.DataFrame) -> dict[str, Any]:
    """Per assessed label: model–reader kappa (per reader and pooled), the model's sensitivity and
    specificity against the readers' majority of each result, and inter-reader kappa per pair."""
    records = reviews.attrs.get("records", {})
    readers = sorted(reviews["reader"].unique()) if not reviews.empty else []
    out: dict[str, Any] = {"reviews": len(reviews), "results": int(reviews["result_id"].nunique()) if len(reviews) else 0,
                           "readers": readers, "labels": {}}
    for label in LABELS:
        rows = [(r["result_id"], r["reader"], r[label]) for _, r in reviews.iterrows()
                if label in assessed(records.get(r["result_id"], {})) and not np.isnan(r[label])]
        if not rows:
            continue
        table = pd.DataFrame(rows, columns=["result_id", "reader", "truth"])
        table["model"] = [float(label in called(records[i])) for i in table["result_id"]]
        entry: dict[str, Any] = {"n": len(table), "model_kappa": _kappa(table["model"].to_numpy(), table["truth"].to_numpy()),
                                 "per_reader": {}}
        for reader, part in table.groupby("reader"):
            entry["per_reader"][reader] = {"n": len(part),
                                           "kappa": _kappa(part["model"].to_numpy(), part["truth"].to_numpy())}
        majority = table.groupby("result_id").agg(model=("model", "first"), yes=("truth", "sum"), n=("truth", "size"))
        majority = majority[majority["yes"] * 2 != majority["n"]]
        positive, negative = majority[majority["yes"] * 2 > majority["n"]], majority[majority["yes"] * 2 < majority["n"]]
        entry["positives"], entry["negatives"] = len(positive), len(negative)
        entry["sensitivity"] = round(float(positive["model"].mean()), 4) if len(positive) else None
        entry["specificity"] = round(float(1 - negative["model"].mean()), 4) if len(negative) else None
        pairs = {}
        wide = table.pivot_table(index="result_id", columns="reader", values="truth", aggfunc="last")
        for a, b in itertools.combinations(sorted(wide.columns), 2):
            both = wide[[a, b]].dropna()
            pairs[f"{a} × {b}"] = {"n": len(both), "kappa": _kappa(both[a].to_numpy(), both[b].to_numpy())}
        entry["inter_reader"] = pairs
        out["labels"][label] = entry
    return out
