"""Watching a site over time from its results store (``pneumoscan monitor``): drift in what
arrives and what the model says, performance estimated without labels, and the reviewers' truth."""

from __future__ import annotations

from typing import Any


def read_store(store, batch: int = 1000) -> tuple[list, dict[int, dict[str, float]]]:
    """The watched rows of every stored result (stored order) and, per reviewed result, the
    readers' labels (majority of their current reviews; :func:`pneumoscan.store.review.film_labels`)."""
    from pneumoscan.labels import LABELS
    from pneumoscan.monitoring.watch import film_row
    from pneumoscan.store.review import current_reviews, film_labels

    rows = [film_row(i, at, record) for i, at, _, record in store.each_result(batch)]
    reviews = current_reviews(store.review_rows())
    truth: dict[int, dict[str, float]] = {}
    if not reviews.empty:
        labels, _ = film_labels(reviews)
        by_film = {int(r["film_id"]): {label: float(r[label]) for label in LABELS} for _, r in labels.iterrows()}
        for result_id, film_id in zip(reviews["result_id"], reviews["film_id"]):
            truth[int(result_id)] = by_film[int(film_id)]
    return rows, truth


def summary_line(report: dict[str, Any]) -> str:
    """One line for a terminal or a cron mail."""
    windows, alerts = report["windows"], report["alerts"]
    moved = sorted({a["statistic"] for a in alerts})
    return (f"{sum(w['films'] for w in windows):,} films in {len(windows)} windows after a reference of "
            f"{report['reference']['films']:,}: {len(alerts)} alerts" + (f" ({', '.join(moved)})" if moved else ""))
